"""lorakit.tasks: a task owns what differs between tasks (data, labels, loss, metrics, defaults, heads)."""

import pytest
import torch

from lorakit import LorakitError
from lorakit.data import DatasetSplits
from lorakit.tasks import TASKS, ClassificationTask, LanguageModelTask, evaluate, get_task, register_task
from tiny_training import save_tiny_classifier, save_tiny_llama


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("tasks")
    return {"cls": str(save_tiny_classifier(root / "cls", num_labels=3)), "llm": str(save_tiny_llama(root / "llm"))}


def test_the_registered_tasks_keep_their_defaults():
    defaults = {name: (t.metric, t.max_length_cap, t.default_epochs, t.epochs(False), t.min_steps, t.min_examples,
                       t.default_eval_batch_size, t.trains_head) for name, t in TASKS.items()}
    assert defaults == {"classify": ("accuracy", 256, 3.0, 2.0, 600, 9_600, 64, True),
                        "regress": ("rmse", 256, 3.0, 2.0, 600, 9_600, 64, True),
                        "chat": ("loss", 512, 1.0, 1.0, 0, 0, 8, False),
                        "text": ("loss", 512, 1.0, 1.0, 0, 0, 8, False)}


def test_a_registered_task_brings_its_own_defaults_to_training(tiny, tmp_path):
    from lorakit.models import load_classifier
    from lorakit.train import TrainConfig, train

    words = ["red", "green", "blue"]
    records = [{"text": f"the {words[i % 3]} film", "label": words[i % 3], "_where": f"r {i}"} for i in range(48)]
    task = register_task(ClassificationTask(
        name="colours", load_model=lambda spec, labels: load_classifier(tiny["cls"], id2label=labels),
        default_data=lambda: DatasetSplits(records[:40], records[40:44], records[44:], "colours"),
        max_length_cap=12, default_epochs=2.0, default_eval_batch_size=3))
    try:
        config = TrainConfig(task="colours", batch_size=8, progress=False, bf16=False, out=str(tmp_path / "run"))
        assert config.eval_batch_size == 3
        report = train(config)
    finally:
        TASKS.pop(task.name)
    assert report["steps"] == 2 * (40 // 8)  # two epochs, the task's default
    assert report["max_length"] == 12 and report["test"]["examples"] == 4  # the recipe kept to the task's cap
    # the head (3 classes) trained in full next to the adapter: the task's heads
    assert report["trainable_params"] == 2 * 2 * (8 * 32 + 32 * 8) + 32 * 3 + 3


def test_evaluate_sums_the_task_stats_into_its_metrics(tiny):
    from lorakit.data import collate
    from lorakit.models import load_causal_lm, load_classifier

    classify = get_task("classify")
    model, tokenizer = load_classifier(tiny["cls"], id2label=["a", "b", "c"])
    examples = classify.encode([{"text": t, "label": label, "_where": "x"} for t, label in
                                (("good", "a"), ("bad film", "b"), ("the dull movie", "c"), ("fine", "a"))],
                               tokenizer, 16, ["a", "b", "c"])
    metrics = evaluate(classify, model, examples.examples, 0, batch_size=3)
    with torch.no_grad():
        logits = torch.cat([model(**{k: v for k, v in collate([e], 0).items() if k != "labels"}).logits
                            for e in examples.examples])
    labels = torch.tensor([e.label for e in examples.examples])
    assert metrics["accuracy"] == pytest.approx(float((logits.argmax(-1) == labels).float().mean()))
    assert metrics["loss"] == pytest.approx(float(torch.nn.functional.cross_entropy(logits, labels)), rel=1e-5)
    assert metrics["examples"] == 4

    text = get_task("text")
    model, tokenizer = load_causal_lm(tiny["llm"])
    examples = text.encode([{"text": "abc"}, {"text": "hello there"}], tokenizer, 32, None).examples
    metrics = evaluate(text, model, examples, tokenizer.pad_token_id, batch_size=1)
    with torch.no_grad():
        per_token = [float(model(input_ids=torch.tensor([e.input_ids]), labels=torch.tensor([e.label])).loss)
                     for e in examples]
    counts = [e.target_count() for e in examples]
    assert metrics["loss"] == pytest.approx(sum(l * n for l, n in zip(per_token, counts)) / sum(counts), rel=1e-5)
    assert set(metrics) == {"loss", "examples", "perplexity"}


def test_each_task_refuses_the_verb_of_the_other_kind(tiny):
    assert isinstance(get_task("chat"), LanguageModelTask) and get_task("chat").chat
    with pytest.raises(LorakitError, match="predict needs a classification adapter; this one is for task 'text': "
                                           "use lorakit generate"):
        get_task("text").predict(None, None, ["x"], None, 8)
    with pytest.raises(LorakitError, match="generate needs a language-model adapter; .* use lorakit predict"):
        get_task("classify").generate(None, None, ["x"], 8)


def test_generate_fits_the_answer_into_a_model_of_learned_positions():
    from transformers import GPT2Config, GPT2LMHeadModel

    from tiny_training import char_tokenizer

    tokenizer = char_tokenizer()
    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(vocab_size=128, n_positions=24, n_embd=16, n_layer=1, n_head=2,
                                       eos_token_id=999)).eval()  # an eos it never generates: runs to the limit
    task = get_task("text")
    with pytest.warns(UserWarning, match="--max-new-tokens 100 does not fit this model's 24 positions after a "
                                         "10-token prompt; generating at most 14"):
        [answer] = task.generate(model, tokenizer, ["0123456789"], 100)  # an IndexError past position 24 before
    assert len(tokenizer(answer)["input_ids"]) <= 14
    with pytest.raises(LorakitError, match="the prompt has 30 tokens and this model takes at most 24"):
        task.generate(model, tokenizer, ["x" * 30], 5)
    # a tokenizer that adds no start token leaves an empty prompt nothing to continue: one line, not a reshape error
    with pytest.raises(LorakitError, match="prompt 2 is empty; give some words to continue"):
        task.generate(model, tokenizer, ["x", ""], 5)
