"""lorakit.train: the loop on tiny random-weight models (and one real-model smoke test).

What is checked: only the adapter and the head change; the loss falls on a learnable
task; gradient accumulation equals one big batch; an interrupted run resumed equals an
uninterrupted one (dropout on, so the random state matters); a NaN stops training and
keeps the last good checkpoint; the saved adapter / full model loads again and gives the
trained model's outputs.
"""

import json
import math

import pytest
import torch
from safetensors.torch import load_file

from lorakit import LorakitError
from lorakit.inference import evaluate_trained, generate, load_trained, predict
from lorakit.report import format_report, read_metrics
from lorakit.train import TrainConfig, TrainingDiverged, TrainingInterrupted, train, warmup_cosine
from tiny_training import chat_records, save_tiny_classifier, save_tiny_llama, write_jsonl

WORDS = ["great", "good", "fine", "bad", "dull", "awful"]


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("models")
    return {"cls": str(save_tiny_classifier(root / "cls")), "cls_dropout": str(save_tiny_classifier(root / "cd", dropout=0.1)),
            "llm": str(save_tiny_llama(root / "llm"))}


@pytest.fixture(scope="module")
def sentiment_file(tmp_path_factory):
    """A learnable toy task: the label says whether the text starts with a positive word (random
    filler words after it, so few texts repeat: a repeated text stays in one part of the split and
    the scores are of texts not trained on)."""
    generator = torch.Generator().manual_seed(0)
    fillers = ["the", "a", "and", "of", "film"]
    records = []
    for i in range(240):
        word = WORDS[int(torch.randint(0, 6, (1,), generator=generator))]
        picks = torch.randint(0, 5, (int(torch.randint(0, 5, (1,), generator=generator)),), generator=generator)
        filler = " ".join(fillers[int(j)] for j in picks)
        records.append({"text": f"{word} movie {filler}".strip(), "label": "pos" if WORDS.index(word) < 3 else "neg"})
    return str(write_jsonl(tmp_path_factory.mktemp("data") / "sentiment.jsonl", records))


def quick(models, tmp_path, **changes) -> TrainConfig:
    settings = dict(model=models["cls"], data_limit=200, steps=6, batch_size=8, eval_every=3, max_length=48,
                    bf16=False, out=str(tmp_path / "run"), progress=False)  # fp32: runs compare to 1e-6
    settings.update(changes)
    return TrainConfig(**settings)


def train_losses(out) -> list[float]:
    return [line["loss"] for line in read_metrics(f"{out}/metrics.jsonl") if "lr" in line]


# ---------------------------------------------------------------- the loop


def test_lora_trains_only_the_adapter_and_the_head_and_writes_its_files(models, tmp_path):
    report = train(quick(models, tmp_path))
    out = tmp_path / "run"
    assert {p.name for p in out.iterdir()} >= {"adapter", "metrics.jsonl", "curves.png", "report.json", "state"}
    assert {p.name for p in (out / "adapter").iterdir()} == {"adapter_config.json", "adapter_model.safetensors",
                                                              "lorakit_task.json"}
    saved = load_file(str(out / "adapter" / "adapter_model.safetensors"))
    lora = [k for k in saved if "lora_" in k]
    assert lora and all(".query." in k or ".value." in k for k in lora)  # BERT's default targets
    assert any(k.endswith("classifier.weight") for k in saved)  # the head, in full
    assert any(float(saved[k].abs().max()) > 0 for k in lora if "lora_B" in k)  # B moved off zero
    # 2 layers x (query, value) x (A: 8x32 + B: 32x8) + classifier 32x2 + 2
    assert report["trainable_params"] == 2 * 2 * (8 * 32 + 32 * 8) + 32 * 2 + 2
    assert report["trainable_percent"] == pytest.approx(100 * report["trainable_params"] / report["total_params"])
    assert json.loads((out / "report.json").read_text())["test"]["examples"] == 20
    assert len(train_losses(out)) == 6
    assert set(report["validation_before"]) >= {"accuracy", "loss"}


def test_init_reaches_the_adapter_and_its_file(models, tmp_path):
    """--init kaiming starts A as PEFT does (uniform, bound 1/sqrt(in)) and is written as init_lora_weights."""
    train(quick(models, tmp_path, init="kaiming", steps=1, lr=1e-9, out=str(tmp_path / "k")))
    config = json.loads((tmp_path / "k" / "adapter" / "adapter_config.json").read_text())
    assert config["init_lora_weights"] is True  # PEFT's name for the Kaiming-uniform init
    saved = load_file(str(tmp_path / "k" / "adapter" / "adapter_model.safetensors"))
    a = next(v for k, v in saved.items() if "lora_A" in k)
    assert float(a.abs().max()) <= 1 / math.sqrt(32) + 1e-6  # hidden 32: the uniform bound
    train(quick(models, tmp_path, init="gaussian", steps=1, lr=1e-9, out=str(tmp_path / "g")))
    saved = load_file(str(tmp_path / "g" / "adapter" / "adapter_model.safetensors"))
    a = next(v for k, v in saved.items() if "lora_A" in k)
    assert float(a.std()) == pytest.approx(1 / 8, rel=0.15)  # the seeds' N(0, 1/r^2), r = 8
    with pytest.raises(LorakitError, match="init 'xavier' is unknown"):
        quick(models, tmp_path, init="xavier")
    with pytest.raises(LorakitError, match="init 'random' cannot be trained here"):
        quick(models, tmp_path, init="random")


def test_bf16_mixed_precision_trains_fp32_weights(models, sentiment_file, tmp_path):
    """--bf16: products in bfloat16 under autocast; the adapter stays fp32 and learns like fp32 does."""
    settings = dict(model=models["cls"], data=sentiment_file, steps=60, batch_size=8, eval_every=30, max_length=48,
                    lr=2e-2, progress=False)
    report = train(TrainConfig(**settings, bf16=True, out=str(tmp_path / "bf16")))
    assert report["bf16"] is True and report["validation_after"]["accuracy"] >= 0.7  # 19 validation examples
    saved = load_file(str(tmp_path / "bf16" / "adapter" / "adapter_model.safetensors"))
    assert {t.dtype for t in saved.values()} == {torch.float32}
    losses = train_losses(tmp_path / "bf16")
    assert sum(losses[-5:]) < sum(losses[:5])


def test_under_bf16_lora_keeps_frozen_weights_in_bf16_and_trains_fp32_factors(models):
    """The frozen model is stored in bf16 (no fp32 copy of weights that never change);
    A, B and the head stay fp32 and are the only ones to get gradients."""
    from lorakit.config import LoraConfig
    from lorakit.model import attach
    from lorakit.models import load_classifier
    from lorakit.methods import frozen_to_bf16

    model, tokenizer = load_classifier(models["cls"])
    attach(model, LoraConfig(r=4, target_modules=["query", "value"], modules_to_save=["classifier"], init="random"))
    frozen_to_bf16(model)
    dtypes = {name: p.dtype for name, p in model.named_parameters()}
    trainable = {name for name, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(dtypes[n] == torch.float32 for n in trainable)
    assert all(dtypes[n] == torch.bfloat16 for n in dtypes if n not in trainable)
    batch = tokenizer(["a great movie", "a dull film"], return_tensors="pt")
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = model(**batch, labels=torch.tensor([1, 0])).loss
    loss.backward()
    assert {n for n, p in model.named_parameters() if p.grad is not None} == trainable
    assert all(p.grad.dtype == torch.float32 and torch.isfinite(p.grad).all()
               for p in model.parameters() if p.grad is not None)


@pytest.fixture(scope="module")
def sentiment_runs(models, sentiment_file, tmp_path_factory):
    """LoRA and full fine-tuning of the tiny classifier on the toy task: {method: (out, report)}."""
    runs = {}
    for method, lr in (("lora", 2e-2), ("full", 3e-3)):
        out = tmp_path_factory.mktemp(method)
        report = train(TrainConfig(model=models["cls"], data=sentiment_file, steps=60, batch_size=8, eval_every=30,
                                   max_length=48, method=method, lr=lr, bf16=False, out=str(out), progress=False))
        runs[method] = (out, report)
    return runs


@pytest.mark.parametrize("method", ["lora", "full"])
def test_the_loss_falls_on_a_learnable_task(sentiment_runs, method):
    out, report = sentiment_runs[method]
    losses = train_losses(out)
    assert sum(losses[-5:]) < sum(losses[:5])
    assert report["validation_before"]["accuracy"] < 0.6 and report["validation_after"]["accuracy"] >= 0.75  # 15 of 19


def test_grad_accumulation_equals_one_big_batch(models, tmp_path):
    big = train(quick(models, tmp_path, batch_size=8, out=str(tmp_path / "big")))
    small = train(quick(models, tmp_path, batch_size=4, grad_accum=2, out=str(tmp_path / "acc")))
    assert big["global_batch"] == small["global_batch"] == 8
    assert train_losses(tmp_path / "acc") == pytest.approx(train_losses(tmp_path / "big"), abs=1e-6)
    a = load_file(str(tmp_path / "big" / "adapter" / "adapter_model.safetensors"))
    b = load_file(str(tmp_path / "acc" / "adapter" / "adapter_model.safetensors"))
    assert all(torch.allclose(a[k], b[k], atol=1e-6) for k in a)


def test_an_interrupted_run_resumed_matches_the_uninterrupted_one(models, tmp_path):
    settings = dict(model=models["cls_dropout"], lora_dropout=0.2, steps=9, eval_every=3)
    train(quick(models, tmp_path, out=str(tmp_path / "whole"), **settings))
    with pytest.raises(TrainingInterrupted, match="stopped at step 4 of 9.*--resume"):
        train(quick(models, tmp_path, out=str(tmp_path / "parts"), stop_after=4, **settings))
    assert json.loads((tmp_path / "parts" / "state" / "last" / "state.json").read_text())["step"] == 4
    report = train(quick(models, tmp_path, out=str(tmp_path / "parts"), resume=True, **settings))
    assert train_losses(tmp_path / "parts") == pytest.approx(train_losses(tmp_path / "whole"), abs=1e-6)
    whole = load_file(str(tmp_path / "whole" / "adapter" / "adapter_model.safetensors"))
    parts = load_file(str(tmp_path / "parts" / "adapter" / "adapter_model.safetensors"))
    assert all(torch.allclose(whole[k], parts[k], atol=1e-6) for k in whole)
    assert report["steps"] == 9


def test_resume_with_other_settings_or_without_a_checkpoint_is_refused(models, tmp_path):
    with pytest.raises(LorakitError, match="no checkpoint to resume"):
        train(quick(models, tmp_path, resume=True))
    with pytest.raises(TrainingInterrupted):
        train(quick(models, tmp_path, stop_after=3))
    with pytest.raises(LorakitError, match=r"other settings \(rank: 8 -> 4\)"):
        train(quick(models, tmp_path, rank=4, resume=True))


def test_resume_on_a_data_file_that_changed_is_refused(models, sentiment_file, tmp_path):
    """The labels flipped under a stopped run: resuming would go on learning the opposite."""
    import shutil

    data = tmp_path / "mine.jsonl"
    shutil.copy(sentiment_file, data)
    with pytest.raises(TrainingInterrupted):
        train(quick(models, tmp_path, data=str(data), stop_after=3))
    original = data.read_text()
    data.write_text(original.replace('"pos"', '"tmp"').replace('"neg"', '"pos"').replace('"tmp"', '"neg"'))
    with pytest.raises(LorakitError, match="mine.jsonl changed since the checkpoint .* was made"):
        train(quick(models, tmp_path, data=str(data), resume=True))
    data.write_text(original)  # as it was: the run goes on
    assert train(quick(models, tmp_path, data=str(data), resume=True))["steps"] == 6


def test_a_nan_loss_stops_training_and_keeps_the_last_good_checkpoint(models, tmp_path, monkeypatch):
    from lorakit.tasks import ClassificationTask

    real = ClassificationTask.batch_stats
    calls = {"n": 0}

    def poisoned(task, model, batch, label_smoothing=0.0):
        stats = real(task, model, batch, label_smoothing)
        calls["n"] += model.training  # evaluation runs in eval mode
        if model.training and calls["n"] == 5:  # the fifth training step
            stats["loss_sum"] = stats["loss_sum"] * float("nan")
        return stats

    monkeypatch.setattr(ClassificationTask, "batch_stats", poisoned)
    with pytest.raises(TrainingDiverged, match="diverged at step 5: loss nan.*checkpoint is at step 3.*lower --lr"):
        train(quick(models, tmp_path))
    state = tmp_path / "run" / "state" / "last"
    assert json.loads((state / "state.json").read_text())["step"] == 3
    assert all(torch.isfinite(t.float()).all() for t in load_file(str(state / "state.safetensors")).values())


def test_bad_settings_are_refused_before_anything_loads(tmp_path):
    with pytest.raises(LorakitError, match="not both"):
        TrainConfig(steps=3, epochs=1)
    with pytest.raises(LorakitError, match="batch_size must be a positive integer, got 0"):
        TrainConfig(batch_size=0)
    with pytest.raises(LorakitError, match="method 'qlora' is unknown"):
        TrainConfig(method="qlora")
    with pytest.raises(LorakitError, match="does not exist"):
        train(TrainConfig(data=str(tmp_path / "missing.jsonl"), out=str(tmp_path / "o")))


def test_warmup_then_cosine_decay():
    values = [warmup_cosine(s, 2, 10) for s in range(11)]
    assert values[0] < values[1] < values[2] == 1.0
    assert all(a >= b for a, b in zip(values[2:], values[3:]))
    assert values[10] == pytest.approx(0.0) and values[6] == pytest.approx(0.5)


# ---------------------------------------------------------------- using what was saved


def test_full_fine_tuning_saves_a_model_folder_that_gives_the_same_outputs(models, tmp_path):
    from transformers import AutoModelForSequenceClassification

    report = train(quick(models, tmp_path, method="full", lr=1e-3, eval_every=6))
    assert report["trainable_params"] == report["total_params"]
    folder = tmp_path / "run" / "model"
    reloaded = AutoModelForSequenceClassification.from_pretrained(folder).eval()
    trained = load_trained([tmp_path / "run"])  # the run folder stands for its model/
    ids = torch.tensor([[2, 10, 11, 12, 3]])
    assert torch.allclose(reloaded(input_ids=ids).logits, trained.model(input_ids=ids).logits, atol=1e-6)
    assert predict(trained, ["great film"])["full"][0]["label"] in ("fresh", "rotten")


def test_predict_eval_and_merge_agree(sentiment_runs):
    adapter = sentiment_runs["lora"][0] / "adapter"
    separate, merged = load_trained([adapter]), load_trained([adapter], merge=True)
    texts = ["a great movie", "the film dull movie"]
    a, b = predict(separate, texts), predict(merged, texts)
    (rows_a,), (rows_b,) = a.values(), b.values()
    assert all(r["label"] == max(r["probabilities"], key=r["probabilities"].get) for r in rows_a)
    assert [r["label"] for r in rows_a] == [r["label"] for r in rows_b]
    for ra, rb in zip(rows_a, rows_b):
        assert sum(ra["probabilities"].values()) == pytest.approx(1.0)
        assert ra["probabilities"]["pos"] == pytest.approx(rb["probabilities"]["pos"], abs=1e-5)
    scores = list(evaluate_trained(separate).values())[0]
    reported = sentiment_runs["lora"][1]["test"]  # lorakit eval gives the report's test scores
    assert scores.pop("classes") == reported["classes"] and scores == pytest.approx(
        {k: v for k, v in reported.items() if k != "classes"})
    assert scores["accuracy"] > scores["majority_accuracy"] and scores["macro_f1"] > scores["majority_macro_f1"]
    both = load_trained([adapter, adapter])
    assert len(predict(both, texts)) == 2
    with pytest.raises(LorakitError, match="own classifier head"):
        load_trained([adapter, adapter], merge=True)


def test_pairs_of_texts_train_and_are_predicted_as_pairs(models, tmp_path):
    """An entailment-shaped file (sentence1, sentence2): each example is tokenized as a pair
    ([CLS] a [SEP] b [SEP]) in training, evaluation and prediction, where a text is 'first<TAB>second'."""
    generator = torch.Generator().manual_seed(0)
    records = []
    for i in range(120):
        a, b = (WORDS[int(j)] for j in torch.randint(0, 6, (2,), generator=generator))
        records.append({"sentence1": f"{a} movie {i}", "sentence2": f"the {b if i % 2 else a} film",
                        "label": "diff" if i % 2 and a != b else "same"})
    data = write_jsonl(tmp_path / "pairs.jsonl", records)
    report = train(quick(models, tmp_path, data=str(data), steps=4))
    assert report["data"]["train"] + report["data"]["validation"] + report["data"]["test"] == 120
    run = tmp_path / "run"
    assert json.loads((run / "adapter" / "lorakit_task.json").read_text())["pairs"] is True
    trained = load_trained([run])
    (rows,) = predict(trained, ["great movie\tthe bad film", "good movie\tthe good film"]).values()
    batch = trained.tokenizer(["great movie", "good movie"], ["the bad film", "the good film"], padding=True,
                              return_tensors="pt")
    assert batch["token_type_ids"].sum() > 0  # BERT's segments: the second text's tokens are type 1
    with torch.no_grad():
        expected = trained.model(**batch).logits.softmax(-1)
    labels = json.loads((run / "adapter" / "lorakit_task.json").read_text())["labels"]
    for row, probs in zip(rows, expected):
        assert [row["probabilities"][label] for label in labels] == pytest.approx(probs.tolist(), abs=1e-6)
    with pytest.raises(LorakitError, match="this adapter classifies pairs of texts"):
        predict(trained, ["great movie"])
    (scores,) = evaluate_trained(trained).values()  # the file split again, as pairs
    assert scores["examples"] == report["data"]["test"]


def test_classifiers_of_other_label_sets_are_predicted_and_scored_together(models, sentiment_runs, tmp_path):
    """A 3-class adapter trained on its own file, given with the 2-class one: each answers with its
    own labels, and each is scored on its own test split, as when given alone."""
    records = [{"text": f"{word} {i}", "label": f"class{1 + i % 3}"} for i in range(90)
               for word in (["red", "green", "blue"][i % 3],)]
    data = write_jsonl(tmp_path / "colours.jsonl", records)
    train(quick(models, tmp_path, data=str(data), data_limit=None, steps=4, max_length=12))
    folders = [sentiment_runs["lora"][0], tmp_path / "run"]
    both, texts = load_trained(folders), ["a great movie", "green 7"]
    together = predict(both, texts)
    assert [set(rows[0]["probabilities"]) for rows in together.values()] == [{"neg", "pos"},
                                                                             {"class1", "class2", "class3"}]
    scores = evaluate_trained(both)
    for folder, name in zip(folders, both.names):
        (alone,) = predict(load_trained([folder]), texts).values()
        for got, want in zip(together[name], alone):
            assert got["label"] == want["label"]
            assert got["probabilities"] == pytest.approx(want["probabilities"], abs=1e-5)
        (want,) = evaluate_trained(load_trained([folder])).values()
        assert scores[name]["examples"] == want["examples"] and scores[name]["classes"] == want["classes"]
        assert scores[name]["accuracy"] == pytest.approx(want["accuracy"])
    with pytest.raises(LorakitError, match="own classifier head"):
        load_trained(folders, merge=True)


def test_an_input_longer_than_the_learned_positions_is_cut_to_them(sentiment_runs):
    trained = load_trained([sentiment_runs["lora"][0] / "adapter"])
    assert trained.max_length() == 48  # as trained
    limit = trained.model.config.max_position_embeddings
    trained.info["max_length"] = 100_000  # a folder written before lengths were checked, or by hand
    assert trained.max_length() == limit
    (rows,) = predict(trained, ["a great movie " * limit]).values()
    assert sum(rows[0]["probabilities"].values()) == pytest.approx(1.0)


def test_chat_lora_trains_on_assistant_turns_and_generates(models, tmp_path):
    data = write_jsonl(tmp_path / "chat.jsonl", chat_records(60))
    report = train(TrainConfig(task="chat", model=models["llm"], data=str(data), steps=30, batch_size=8, lr=2e-2,
                               rank=8, targets="all-linear", out=str(tmp_path / "chat"), progress=False))
    assert report["metric"] == "loss"
    assert report["validation_after"]["loss"] < report["validation_before"]["loss"]
    adapter = tmp_path / "chat" / "adapter"
    answers = generate(load_trained([adapter]), ["say cat"], max_new_tokens=5)
    assert len(list(answers.values())[0][0]) <= 5  # one character a token
    merged = generate(load_trained([adapter], merge=True), ["say cat"], max_new_tokens=5)
    assert list(merged.values()) == list(answers.values())
    with pytest.raises(LorakitError, match="use lorakit generate"):
        predict(load_trained([adapter]), ["x"])


def test_trainable_tokens_train_their_rows_and_the_adapter_loads_in_peft(models, tmp_path):
    """``--trainable-tokens``: tokens (or ids) of the vocabulary train their embedding rows whole beside
    the adapter; the file holds PEFT's key and config, and PEFT computes what lorakit does with it."""
    peft = pytest.importorskip("peft")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from lorakit import load_adapter, read_adapter

    data = write_jsonl(tmp_path / "chat.jsonl", chat_records(60))
    tokenizer = AutoTokenizer.from_pretrained(models["llm"])
    train(TrainConfig(task="chat", model=models["llm"], data=str(data), steps=10, batch_size=8, lr=2e-2, bf16=False,
                      trainable_tokens="</s>, !,7", out=str(tmp_path / "chat"), progress=False))
    adapter = tmp_path / "chat" / "adapter"
    config, tensors = read_adapter(adapter)
    ids = [tokenizer.eos_token_id, tokenizer.convert_tokens_to_ids("!"), 7]
    assert config.trainable_token_indices == ids
    (rows,) = [t for k, t in tensors.items() if k.endswith("model.embed_tokens.token_adapter.trainable_tokens_delta")]
    base = AutoModelForCausalLM.from_pretrained(models["llm"]).eval()
    moved = (rows - base.model.embed_tokens.weight[ids]).abs().amax(1)
    assert moved[0] > 1e-3 and moved[1] > 1e-3  # "</s>" and "!" end every answer: trained
    x = torch.tensor([tokenizer.encode("say cat!</s>")])
    with torch.no_grad():
        ours = load_adapter(AutoModelForCausalLM.from_pretrained(models["llm"]), adapter).eval()(x).logits
        theirs = peft.PeftModel.from_pretrained(base, adapter).eval()(x).logits
    torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=0)
    with pytest.raises(LorakitError, match="'<nope>' is not a token of the model's vocabulary"):
        train(TrainConfig(task="chat", model=models["llm"], data=str(data), steps=1, trainable_tokens="<nope>",
                          out=str(tmp_path / "nope"), progress=False))
    with pytest.raises(LorakitError, match="--trainable-tokens is for --method lora"):
        TrainConfig(task="chat", method="full", trainable_tokens="7")


def test_a_base_model_without_a_chat_template_learns_chats_with_chatml(tmp_path):
    """A base model's tokenizer has no template: chats are refused with the flag to give; with
    --chat-template chatml they train, the adapter carries the template, and loading it again
    (eval, generate, merge) renders chats the same way and stops at the end of a turn."""
    from lorakit import chat_templates

    base = str(save_tiny_llama(tmp_path / "base", chat_template=False))
    data = write_jsonl(tmp_path / "chat.jsonl", chat_records(60))
    with pytest.raises(LorakitError, match="no chat template; give --chat-template chatml"):
        train(TrainConfig(task="chat", model=base, data=str(data), steps=1, out=str(tmp_path / "r"), progress=False))
    with pytest.raises(LorakitError, match="--chat-template is for a task that generates"):
        TrainConfig(task="classify", chat_template="chatml")
    with pytest.raises(LorakitError, match="'nope.jinja' is neither a template name"):
        TrainConfig(task="chat", chat_template="nope.jinja")
    # the output layer adapted too: this 32-wide model's frozen head alone cannot make a token likely
    report = train(TrainConfig(task="chat", model=base, data=str(data), steps=100, batch_size=8, lr=2e-2, rank=8,
                               targets=r".*(_proj|lm_head)$", chat_template="chatml", out=str(tmp_path / "chat"),
                               progress=False))
    assert report["validation_after"]["loss"] < 0.4 * report["validation_before"]["loss"]
    adapter = tmp_path / "chat" / "adapter"
    template = (adapter / chat_templates.FILE).read_text()
    assert template.startswith("{%- for message in messages") and "</s>" in template  # turns end with the eos
    trained = load_trained([adapter])
    assert trained.tokenizer.chat_template == template
    (scores,) = evaluate_trained(trained).values()  # the chats rendered as in training: the same loss
    assert scores["loss"] == pytest.approx(report["test"]["loss"], rel=1e-2)  # training ran in bf16
    prompts = ["say cat", "say moon", "say tree"]
    answers = list(generate(trained, prompts, max_new_tokens=12).values())[0]
    # the answers' shape learned ("word!"), each stopped at the end of its turn (the eos), not at 12 tokens
    assert all(answer.endswith("!") and len(answer) <= 6 for answer in answers), answers
    assert list(generate(load_trained([adapter], merge=True), prompts, max_new_tokens=12).values())[0] == answers
    # the base model alone is given a template by name; an adapter's own still wins over the one given
    alone = load_trained([], model=base, chat_template="chatml")
    assert alone.tokenizer.chat_template == template
    assert len(generate(alone, prompts[:1], max_new_tokens=2)["base"]) == 1
    other = tmp_path / "other.jinja"
    other.write_text("{% for m in messages %}{{ m['content'] }}{% endfor %}")
    assert load_trained([], model=base, chat_template=str(other)).tokenizer.chat_template == other.read_text()
    assert load_trained([adapter], chat_template=str(other)).tokenizer.chat_template == template
    with pytest.raises(LorakitError, match="'nope.jinja' is neither a template name"):
        load_trained([adapter], chat_template="nope.jinja")
    with pytest.raises(LorakitError, match="--chat-template is for a model that generates; task 'classify'"):
        load_trained([], task="classify", chat_template="chatml")


def test_a_tokenizer_of_another_model_is_refused_before_training(models, tmp_path):
    import shutil

    from tiny_training import char_tokenizer

    folder = tmp_path / "mismatched"
    shutil.copytree(models["llm"], folder)
    tokenizer = char_tokenizer()
    tokenizer.add_tokens([f"<x{i}>" for i in range(40)])  # ids past the model's 128 rows
    tokenizer.save_pretrained(folder)
    data = write_jsonl(tmp_path / "x.jsonl", [{"prompt": f"<x39> say {i}", "completion": " cat"} for i in range(12)])
    with pytest.raises(LorakitError, match=r"gives token id 1\d\d, but the model's embedding has 128 rows"):
        train(TrainConfig(task="chat", model=str(folder), data=str(data), steps=1, out=str(tmp_path / "r"),
                          progress=False))


@pytest.mark.slow
def test_smoke_real_minilm_on_real_reviews(tmp_path):
    """The embedded all-MiniLM-L6-v2 on 200 real reviews, a few steps: the default
    path end to end, and PEFT loads the adapter it saved to the same outputs."""
    from peft import PeftModel

    report = train(TrainConfig(data_limit=200, steps=3, batch_size=8, eval_every=3, out=str(tmp_path / "real"),
                               progress=False))
    assert report["trainable_params"] == 6 * 2 * (8 * 384 + 384 * 8) + 384 * 2 + 2
    assert report["trainable_percent"] < 0.5
    assert 0 <= report["test"]["accuracy"] <= 1 and math.isfinite(report["validation_after"]["loss"])
    trained = load_trained([tmp_path / "real" / "adapter"])
    from lorakit.models import load_classifier

    base, tokenizer = load_classifier("default", id2label=trained.info["labels"])
    peft_model = PeftModel.from_pretrained(base, str(tmp_path / "real" / "adapter")).eval()
    batch = tokenizer(["a moving, funny film"], return_tensors="pt")
    with torch.no_grad():
        ours = trained.model(**batch).logits
        theirs = peft_model(**batch).logits
    assert torch.allclose(ours, theirs, atol=1e-5)


def test_eval_refuses_to_split_again_a_data_file_that_changed_since_training(models, tmp_path):
    data = tmp_path / "mine.jsonl"
    records = [{"text": f"{WORDS[i % 6]} film {i}", "label": "pos" if i % 6 < 3 else "neg"} for i in range(60)]
    write_jsonl(data, records)
    train(quick(models, tmp_path, data=str(data), data_limit=None, steps=2))
    trained = load_trained([tmp_path / "run"])
    assert list(evaluate_trained(trained).values())[0]["examples"] == 6
    with open(data, "a") as handle:
        handle.write(json.dumps({"text": "one more", "label": "pos"}) + "\n")
    with pytest.raises(LorakitError, match="mine.jsonl changed since this run trained on it"):
        evaluate_trained(trained)
    other = write_jsonl(tmp_path / "other.jsonl", [{"review": r["text"], "label": r["label"]} for r in records[:5]])
    scored = evaluate_trained(trained, str(other), columns={"text": "review"})
    assert list(scored.values())[0]["examples"] == 5


def test_a_run_that_learned_nothing_says_so_and_why(models, tmp_path):
    """A rate too small to move the weights: the report ends with the warning and the line saying the
    training loss stayed at what knowing only the class shares gives (80% / 20% here)."""
    rows = [{"text": f"{WORDS[i % 6]} movie number {i}", "label": "pos" if i % 5 else "neg"} for i in range(200)]
    data = write_jsonl(tmp_path / "skewed.jsonl", rows)
    result = train(quick(models, tmp_path, data=str(data), data_limit=None, lr=1e-9, steps=4, eval_every=4))
    assert result["warning"].startswith("warning: test") and "train longer" not in result["warning"]
    assert result["why"].startswith("why: the training loss ended at") and "--lr 5e-10 or 2e-09" in result["why"]
    report = json.loads((tmp_path / "run" / "report.json").read_text())
    assert report["why"] == result["why"]
    assert format_report(report).splitlines()[-2:] == [result["warning"], result["why"]]


def test_records_with_nothing_to_learn_are_dropped_with_a_warning(models, tmp_path):
    """With no end-of-text token, a one-token completion after an empty prompt predicts nothing."""
    import shutil

    from lorakit.tasks.base import TruncationWarning
    from tiny_training import char_tokenizer

    folder = tmp_path / "no_eos"
    shutil.copytree(models["llm"], folder)
    tokenizer = char_tokenizer()
    tokenizer.eos_token = None
    tokenizer.save_pretrained(folder)
    rows = [{"prompt": f"say {i}", "completion": f" ok {i}"} for i in range(30)] + [{"prompt": "", "completion": "x"}] * 5
    data = write_jsonl(tmp_path / "c.jsonl", rows)
    with pytest.warns(TruncationWarning, match="5 of 35 examples had no token to learn from and were dropped"):
        train(TrainConfig(task="text", model=str(folder), data=str(data), steps=1, max_length=64,
                          out=str(tmp_path / "c"), progress=False))
