"""lorakit.recipe: the batch, step floor, learning rate and max length chosen from the data,
each by its rule, each kept when the user gives it."""

import math
from dataclasses import replace

import numpy as np
import pytest

from lorakit import recipe
from lorakit.memory import MemoryEstimate, predict_peak
from lorakit.methods import get_method
from lorakit.errors import LorakitError
from lorakit.tasks import ClassificationTask, get_task
from lorakit.train_config import TrainConfig

CLASSIFY, LORA = get_task("classify"), get_method("lora")


def records(n: int, labels=("a", "b")) -> list[dict]:
    return [{"text": "x", "label": labels[i % len(labels)], "_where": f"r {i}"} for i in range(n)]


def plan(n: int, world_size: int = 1, bf16: bool = True, **given):
    config = TrainConfig(max_length=64, **given)  # the length rule is tested on its own below
    config, choices = recipe.choose(config, CLASSIFY, get_method(config.method), records(n), tokenizer=None, model=None,
                                    world_size=world_size, bf16=bf16)
    global_batch = config.batch_size * config.grad_accum * world_size
    steps, length = recipe.run_length(config, CLASSIFY, n, global_batch, bf16)
    return config, global_batch, steps, {c.name: c for c in choices + ([length] if length else [])}


@pytest.mark.parametrize("n, batch, steps", [
    (10_752, 32, 1_008),  # the default task: 3 epochs of 336 steps, as before the recipe
    (8_000, 32, 750),     # 3 epochs of 250
    (4_000, 16, 750),     # at 32, 3 epochs are 375 steps: under the floor of 600
    (2_000, 8, 1_200),    # 3 epochs of 250 = 750 steps: the floor of 9,600 examples makes it 1,200
    (480, 8, 1_200),      # 3 epochs of 60 = 180 steps: the floors make it 20
    (100, 8, 240),        # the floor would be 120 epochs: capped at 20
])
def test_batch_and_steps_follow_their_rule(n, batch, steps):
    config, global_batch, total, choices = plan(n)
    assert (global_batch, total, config.lr) == (batch, steps, LORA.default_lr)
    # the floors: at least min_steps and min_examples seen, or MAX_EPOCHS epochs when fewer
    assert total >= min(CLASSIFY.min_steps, recipe.MAX_EPOCHS * (n // batch))
    assert total * batch >= min(CLASSIFY.min_examples, recipe.MAX_EPOCHS * (n // batch) * batch)
    # the batch: the largest whose 3 epochs reach the floor (8 when none does)
    larger = [b for b in recipe.BATCHES if b > batch]
    assert all(n // b * CLASSIFY.default_epochs < CLASSIFY.min_steps for b in larger)
    assert set(choices) == {"batch_size", "lr", "steps"}
    assert all(c.line().startswith(f"recipe: {c.name} ") and c.line().endswith("to set)") for c in choices.values())


@pytest.mark.parametrize("n, batch, steps", [
    (10_752, 32, 672),  # the default task in fp32: 2 epochs of 336 steps
    (10_000, 32, 624),  # 2 epochs of 312
    (8_000, 16, 1_000),  # at 32, 2 epochs are 500 steps: under the floor of 600
    (480, 8, 1_200),    # the floors, whatever the precision
])
def test_in_fp32_the_classifier_takes_fewer_epochs(n, batch, steps):
    config, global_batch, total, choices = plan(n, bf16=False)
    assert (global_batch, total) == (batch, steps)
    shortened = n // batch * CLASSIFY.epochs(False) >= recipe.step_floor(CLASSIFY, batch)[0]  # no floor sets it
    assert config.lr == (LORA.short_run_lr if shortened else LORA.default_lr) and LORA.short_run_lr == 1.5e-3
    assert ("shortened in fp32" in choices["lr"].reason) == shortened
    assert plan(n, bf16=False, lr=7e-4)[0].lr == 7e-4  # --lr wins
    assert plan(n, bf16=False, method="full")[0].lr == get_method("full").default_lr  # no short-run rate of its own
    assert CLASSIFY.epochs(False) == 2 and CLASSIFY.epochs(True) == CLASSIFY.default_epochs == 3
    assert all(n // b * CLASSIFY.epochs(False) < CLASSIFY.min_steps for b in recipe.BATCHES if b > batch)
    if total > recipe.step_floor(CLASSIFY, batch)[0]:
        assert "the task's 2 epochs" in choices["steps"].reason and "in fp32" in choices["steps"].reason
    assert plan(n, bf16=False, epochs=3)[2] == 3 * (n // batch)  # --epochs wins
    assert get_task("chat").epochs(False) == get_task("chat").epochs(True)  # a task without fp32 epochs


def test_the_floor_of_examples_reads_in_steps_of_the_batch():
    assert CLASSIFY.min_examples == 9_600 and CLASSIFY.min_steps == 600
    assert recipe.step_floor(CLASSIFY, 8) == (1_200, "1200 steps (9,600 examples at batch 8)")
    assert recipe.step_floor(CLASSIFY, 32) == (600, "600 steps")  # 300 steps see 9,600: the step floor is higher
    assert recipe.step_floor(get_task("chat"), 8) == (0, "0 steps")  # a task without floors
    _, _, total, choices = plan(900)  # 3 epochs of 112 steps at batch 8: raised to 1,200
    assert total == 1_200 and "under the floor of 1200 steps (9,600 examples at batch 8)" in choices["steps"].reason


def test_what_the_user_gives_is_kept_and_not_explained():
    config, global_batch, total, choices = plan(480, batch_size=16, lr=3e-3, epochs=2)
    assert (global_batch, config.lr, total) == (16, 3e-3, 2 * 30)  # no floor under --epochs
    assert choices == {}
    config, global_batch, total, choices = plan(480, steps=7)
    assert (global_batch, total) == (8, 7) and set(choices) == {"batch_size", "lr"}
    config, global_batch, total, _ = plan(480, batch_size=32)  # a given batch still gets the floor (at most 20 epochs)
    assert (global_batch, total, config.lr) == (32, 300, 1e-3)
    config, _, _, _ = plan(480, method="full")
    assert config.lr == get_method("full").default_lr


def test_the_global_batch_is_shared_by_processes_and_accumulation():
    config, global_batch, _, choices = plan(10_752, world_size=2, grad_accum=2)
    assert (config.batch_size, global_batch) == (8, 32)
    assert "(8 per forward pass)" in choices["batch_size"].reason


class Lengths(ClassificationTask):
    """A task whose token lengths are the records' ``n``."""

    def token_lengths(self, records, tokenizer):
        return [r["n"] for r in records]


class Limited:
    model_max_length = 64


@pytest.mark.parametrize("lengths, cap, tokenizer, expected", [
    (range(1, 101), 256, None, 112),  # p99 = 99.01 tokens -> 100 -> a multiple of 16
    (range(1, 101), 48, None, 48),     # the task's cost cap
    (range(1, 101), 256, Limited(), 64),  # the model's limit
    ([3] * 50, 256, None, 16),         # never under 16
    ([40] * 990 + [500] * 10, 256, None, 48),  # 1% of outliers do not set the length
])
def test_max_length_follows_its_rule(lengths, cap, tokenizer, expected):
    task = Lengths(name="lengths", load_model=None, default_data=None, max_length_cap=cap, default_epochs=1,
                   default_eval_batch_size=1)
    chosen, reason = recipe.max_length_for(task, [{"n": n} for n in lengths], tokenizer, model=None)
    assert chosen == expected
    assert reason.startswith("99% of") and reason.endswith("fit whole")


@pytest.fixture(scope="module")
def minilm():
    from lorakit.models import load_classifier

    return load_classifier("default", id2label=["fresh", "rotten"])


@pytest.mark.slow
def test_on_200_real_reviews_the_length_is_the_99th_percentile_rounded_up(minilm):
    from lorakit.data import rotten_tomatoes

    model, tokenizer = minilm
    slice_ = rotten_tomatoes(limit=200).train
    lengths = [len(ids) for ids in tokenizer([r["text"] for r in slice_])["input_ids"]]
    chosen, _ = recipe.max_length_for(CLASSIFY, recipe.sample_records(slice_), tokenizer, model)
    p99 = math.ceil(np.percentile(lengths, 99))
    assert chosen % 16 == 0 and chosen - 16 < p99 <= chosen


@pytest.mark.slow
def test_the_default_task_keeps_the_measured_recipe(minilm):
    """`lorakit train` with no flags: batch 32, lr 1e-3, max length 64, 3 epochs = 1,008 steps."""
    from lorakit.data import rotten_tomatoes

    model, tokenizer = minilm
    train = rotten_tomatoes().train
    config, choices = recipe.choose(TrainConfig(), CLASSIFY, LORA, train, tokenizer, model, predict=predict_peak)
    steps, _ = recipe.run_length(config, CLASSIFY, len(train), config.batch_size)
    assert (config.batch_size, config.grad_accum, config.lr, config.max_length, steps) == (32, 1, 1e-3, 64, 1_008)
    assert len(recipe.sample_records(train)) == recipe.SAMPLE_SIZE
    assert recipe.sample_records(train) == recipe.sample_records(train)  # seeded
    assert replace(config, out="x").max_length == 64


def _predictor(bytes_per_example: int, seen: list):
    """A stand-in for predict_peak whose activations grow by ``bytes_per_example`` per example."""
    def predict(config):
        seen.append((config.batch_size, config.grad_accum, config.max_length))
        return MemoryEstimate(weights=0, gradients=0, optimizer=0, allocator=0, runtime=0, tensors=0, trainable=0,
                              activations=bytes_per_example * config.batch_size, tokens=0)
    return predict


@pytest.mark.parametrize("mib_per_example, passes", [(16, 1), (40, 2), (100, 4), (600, 32), (2048, 32)])
def test_micro_batches_keep_one_pass_under_the_budget(mib_per_example, passes):
    seen = []
    config, choices = recipe.choose(TrainConfig(max_length=64), CLASSIFY, LORA, records(10_752), tokenizer=None,
                                    model=None, predict=_predictor(mib_per_example * 2**20, seen))
    assert seen == [(32, 1, 64)]  # one prediction, of one pass over the whole batch at the chosen length
    assert (config.grad_accum, config.batch_size) == (passes, 32 // passes)  # the same global batch of 32
    names = [c.name for c in choices]
    assert ("grad_accum" in names) == (passes > 1) and names[0] == "batch_size"
    if 1 < passes < 32:
        assert mib_per_example * 32 / passes <= 1024 < mib_per_example * 64 / passes


def test_micro_batches_are_not_chosen_where_the_user_set_the_batch_or_passes():
    seen = []
    for given in (dict(batch_size=32), dict(grad_accum=2)):
        config, _ = recipe.choose(TrainConfig(max_length=64, **given), CLASSIFY, LORA, records(10_752), tokenizer=None,
                                  model=None, predict=_predictor(2**30, seen))
        assert config.grad_accum == given.get("grad_accum", 1)
    assert seen == []


def test_a_failed_prediction_leaves_one_pass_and_says_why():
    def broken(config):
        raise LorakitError("the memory prediction for m failed: no config")

    config, choices = recipe.choose(TrainConfig(max_length=64), CLASSIFY, LORA, records(10_752), tokenizer=None,
                                    model=None, predict=broken)
    assert config.grad_accum == 1 and "no config" in {c.name: c for c in choices}["grad_accum"].reason


@pytest.mark.slow
def test_the_chat_task_trains_in_micro_batches_at_fp32():
    """SmolLM2 on the chatterbot corpus, fp32: one pass of 32 x 80 tokens is predicted at ~3 GiB of
    activations, so the step of 32 runs as 4 passes of 8."""
    from lorakit.models import load_causal_lm
    from lorakit.tasks import read_splits

    chat = get_task("chat")
    model, tokenizer = load_causal_lm("default-chat")
    train = read_splits(chat, "default").train
    config, choices = recipe.choose(TrainConfig(task="chat", bf16=False), chat, LORA, train, tokenizer, model,
                                    predict=predict_peak)
    assert (config.batch_size * config.grad_accum, config.grad_accum, config.max_length) == (32, 4, 80)
    assert "GiB of activations" in {c.name: c for c in choices}["grad_accum"].reason


def test_a_max_length_past_a_learned_position_table_is_refused_and_rotary_models_have_no_such_limit():
    from transformers import RobertaConfig, RobertaForSequenceClassification

    from lorakit.targets import position_limit
    from tiny_models import tiny_bert_classifier, tiny_gpt2, tiny_llama

    bert = tiny_bert_classifier()
    roberta = RobertaForSequenceClassification(RobertaConfig(  # 66 rows, 2 of them for the padding offset
        vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4,
        max_position_embeddings=66, pad_token_id=1))
    assert (position_limit(bert), position_limit(tiny_gpt2()), position_limit(roberta), position_limit(tiny_llama())
            ) == (64, 64, 64, None)
    with pytest.raises(LorakitError, match="--max-length 65 is longer than BertForSequenceClassification takes: its "
                                           "learned positions stop at 64 tokens; give --max-length 64 or less"):
        recipe.choose(TrainConfig(max_length=65, batch_size=8, lr=1e-3), CLASSIFY, LORA, records(100),
                      tokenizer=None, model=bert)
    config, _ = recipe.choose(TrainConfig(max_length=64, batch_size=8, lr=1e-3), CLASSIFY, LORA, records(100),
                              tokenizer=None, model=bert)
    assert config.max_length == 64
    config, _ = recipe.choose(TrainConfig(max_length=4096, batch_size=8, lr=1e-3), CLASSIFY, LORA, records(100),
                              tokenizer=None, model=tiny_llama())
    assert config.max_length == 4096  # rotary positions: longer than trained is the user's call, not a crash
