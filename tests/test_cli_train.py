"""`lorakit train / eval / predict / generate` from the command line, including a run
killed mid-way (SIGKILL, and Ctrl-C) and resumed to the same loss curve."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from lorakit.cli import build_parser, main
from lorakit.report import read_metrics
from tiny_training import chat_records, save_tiny_classifier, save_tiny_llama, write_jsonl


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("cli")
    return {"cls": str(save_tiny_classifier(root / "cls", dropout=0.1)), "llm": str(save_tiny_llama(root / "llm")),
            "chat": str(write_jsonl(root / "chat.jsonl", chat_records(40))), "root": root}


def args(tiny, out, *extra):
    return ["train", "--model", tiny["cls"], "--data-limit", "200", "--batch-size", "8", "--max-length", "48",
            "--out", str(out), *extra]


def losses(out):
    return [line["loss"] for line in read_metrics(f"{out}/metrics.jsonl") if "lr" in line]


def test_train_has_exactly_the_issue_flags():
    parser = build_parser()
    sub = parser._subparsers._group_actions[0].choices["train"]
    flags = {option for action in sub._actions for option in action.option_strings}
    assert flags >= {"--task", "--model", "--data", "--method", "--rank", "--alpha", "--targets", "--steps",
                     "--epochs", "--batch-size", "--grad-accum", "--lr", "--max-length", "--eval-every", "--out",
                     "--resume", "--seed"}
    with pytest.raises(SystemExit):
        main(["train", "--steps", "3", "--epochs", "1"])


OLD_FLAGS = {"--task", "--model", "--data", "--method", "--rank", "--alpha", "--init-rank", "--target-rank", "--targets",
             "--steps", "--epochs", "--batch-size", "--grad-accum", "--lr", "--max-length", "--bf16", "--no-bf16",
             "--eval-every", "--init", "--lora-dropout", "--warmup", "--weight-decay", "--out", "--resume", "--seed",
             "--model-dropout", "--label-smoothing", "--data-limit", "--device"}


def test_the_flags_are_made_from_the_config_fields_and_keep_their_names():
    from dataclasses import fields

    from lorakit.cli.train import config_from_args
    from lorakit.train import TrainConfig

    parser = build_parser()
    sub = parser._subparsers._group_actions[0].choices["train"]
    actions = {a.dest: a for a in sub._actions if a.dest != "help"}
    assert set(actions) == {f.name for f in fields(TrainConfig) if f.metadata["flag"]}
    assert all(f.metadata["help"] for f in fields(TrainConfig))  # every field says what it does
    added = {"--overwrite", "--loraplus-ratio", "--fsdp", "--dora", "--quantize", "--gradient-checkpointing", "--class-weights",
             "--text-column", "--label-column", "--prompt-column", "--completion-column", "--messages-column",
             "--stream", "--no-stream", "--stream-buffer", "--compile", "--chat-template", "--layers-to-transform",
             "--trainable-tokens", "--lora-bias", "--bias", "--target-parameters", "--rslora", "--modules-to-save"}
    assert {option for a in actions.values() for option in a.option_strings} == OLD_FLAGS | added
    # a flag not given leaves the dataclass's default: the defaults are written once
    assert config_from_args(parser.parse_args(["train"])) == TrainConfig()
    assert "(default: 8)" in actions["rank"].help
    assert "classify 256, regress 256, chat 512, text 512" in actions["max_length"].help
    config = config_from_args(parser.parse_args(["train", "--no-bf16", "--epochs", "2", "--targets", "query,value",
                                                 "--overwrite", "--alpha", "4", "--init", "kaiming"]))
    assert (config.bf16, config.epochs, config.targets, config.overwrite, config.alpha, config.init) == \
        (False, 2.0, ["query", "value"], True, 4.0, "kaiming")
    with pytest.raises(SystemExit):
        parser.parse_args(["train", "--init", "random"])


def test_train_then_eval_predict(tiny, tmp_path, capsys):
    assert main(args(tiny, tmp_path / "run", "--steps", "4", "--eval-every", "2")) == 0
    printed = capsys.readouterr().out
    assert "validation accuracy" in printed and "trainable params" in printed and "saved to" in printed
    adapter = str(tmp_path / "run" / "adapter")
    assert main(["eval", "--adapter", adapter]) == 0
    assert "accuracy" in capsys.readouterr().out
    assert main(["predict", "--adapter", adapter, "a great film", "dull"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 2 and all("fresh" in line and "rotten" in line for line in lines)
    assert main(["predict", "--adapter", adapter, "--adapter", adapter, "ok"]) == 0
    assert capsys.readouterr().out.count("[") == 2
    # the run folder (--out) stands for its adapter/
    run = str(tmp_path / "run")
    assert main(["eval", "--adapter", run]) == 0
    assert capsys.readouterr().out.startswith("run_adapter: loss")
    assert main(["predict", "--adapter", run, "a great film"]) == 0
    assert "fresh" in capsys.readouterr().out


def test_predict_reads_texts_from_standard_input_and_refuses_an_empty_one(tiny, tmp_path, capsys, monkeypatch):
    import io

    assert main(args(tiny, tmp_path / "run", "--steps", "2")) == 0
    capsys.readouterr()
    monkeypatch.setattr("sys.stdin", io.StringIO("a great film\n\ndull and long\n"))
    assert main(["predict", "--adapter", str(tmp_path / "run"), "-"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert [line.split(")  ", 1)[1] for line in lines] == ["a great film", "dull and long"]
    assert main(["predict", "--adapter", str(tmp_path / "run"), " "]) == 2
    assert "a text to classify is empty" in capsys.readouterr().err


def test_predict_shows_the_likeliest_five_of_many_classes(tiny, tmp_path, capsys):
    data = write_jsonl(tmp_path / "intents.jsonl", [{"text": f"ask number {i} about {i % 8}", "label": f"intent{i % 8}"}
                                                    for i in range(80)])
    assert main(args(tiny, tmp_path / "run", "--data", str(data), "--steps", "1")) == 0
    capsys.readouterr()
    assert main(["predict", "--adapter", str(tmp_path / "run"), "ask about 3"]) == 0
    line = capsys.readouterr().out.strip()
    assert line.count("intent") == 1 + 5 and "; top 5 of 8)" in line
    shown = [float(part.split()[1]) for part in line.split("(", 1)[1].split(";")[0].split("  ")]
    assert shown == sorted(shown, reverse=True)  # likeliest first


def test_train_method_adalora_saves_the_rank_budget_and_loads(tiny, tmp_path):
    from lorakit.io import load_adapter
    from lorakit.model import lora_layers
    from lorakit.models import load_classifier

    out = tmp_path / "ada"
    # one evaluation, at the last step: the saved adapter is the one pruned to the final budget
    assert main(args(tiny, out, "--method", "adalora", "--init-rank", "4", "--target-rank", "2",
                     "--steps", "8", "--eval-every", "8")) == 0
    raw = json.loads((out / "adapter" / "adapter_config.json").read_text())
    ranks = {path: raw["rank_pattern"].get(path, raw["r"]) for path in raw["target_modules"]}
    assert raw["peft_type"] == "LORA" and all(1 <= r <= 4 for r in ranks.values())
    budget = 2 * 4  # target rank 2 x (query, value) in each of the tiny model's 2 layers
    assert sum(ranks.values()) == budget
    report = json.loads((out / "report.json").read_text())
    assert report["method"] == "adalora" and (report["init_rank"], report["target_rank"]) == (4, 2)
    model, _ = load_classifier(tiny["cls"])
    load_adapter(model, out / "adapter")
    assert {path for path, _ in lora_layers(model)} == set(ranks)


def test_targets_given_as_a_regex_select_those_modules(tiny, tmp_path):
    """`--targets "query|value"`: one full-match regex against a module's name or path (PEFT's string form)."""
    from lorakit.io import read_adapter

    assert main(args(tiny, tmp_path / "re", "--targets", "query|value", "--steps", "1", "--eval-every", "1")) == 0
    config, tensors = read_adapter(tmp_path / "re" / "adapter")
    adapted = {key.split(".lora_")[0].rsplit(".", 1)[-1] for key in tensors if ".lora_" in key}
    assert adapted == {"query", "value"} and len(tensors) == 2 * 2 * 2 + 2  # A, B x 2 names x 2 layers + the head


def test_layers_to_transform_adapts_those_blocks_only_and_peft_reads_the_file(tiny, tmp_path, capsys):
    from lorakit.io import read_adapter

    out = tmp_path / "last"
    assert main(args(tiny, out, "--layers-to-transform", "1", "--steps", "1", "--eval-every", "1")) == 0
    config, tensors = read_adapter(out / "adapter")
    assert config.layers_to_transform == [1]
    assert {key.split(".layer.")[1].split(".")[0] for key in tensors if ".lora_" in key} == {"1"}
    peft_config = json.loads((out / "adapter" / "adapter_config.json").read_text())
    assert peft_config["layers_to_transform"] == [1]
    assert main(args(tiny, tmp_path / "bad", "--layers-to-transform", "1-x")) == 2
    assert "'1-x' is not a block index or a range such as 8-11" in capsys.readouterr().err
    assert main(args(tiny, tmp_path / "bad", "--layers-to-transform", "0", "--method", "full")) == 2
    assert "--layers-to-transform is for --method lora" in capsys.readouterr().err
    assert main(args(tiny, tmp_path / "bad", "--layers-to-transform", "0", "--targets", "query|value")) == 2
    assert "--layers-to-transform cannot narrow a regex --targets" in capsys.readouterr().err


def peft_and_export_agree(tiny, out, merged_folder):
    """The classifier adapter of run ``out`` gives PEFT's logits, and ``lorakit export`` merges it to them."""
    import peft
    import torch
    from transformers import AutoModelForSequenceClassification

    ours, tokenizer = load_classifier_with(out / "adapter")
    x = tokenizer(["a fine, moving film", "dull"], return_tensors="pt", padding=True)["input_ids"]
    theirs = peft.PeftModel.from_pretrained(AutoModelForSequenceClassification.from_pretrained(tiny["cls"]),
                                            out / "adapter").eval()
    with torch.no_grad():
        torch.testing.assert_close(theirs(input_ids=x).logits, ours(input_ids=x).logits, atol=1e-5, rtol=0)
    assert main(["export", "--adapter", str(out), "--merged", str(merged_folder)]) == 0
    merged = AutoModelForSequenceClassification.from_pretrained(merged_folder).eval()
    with torch.no_grad():
        torch.testing.assert_close(merged(input_ids=x).logits, ours(input_ids=x).logits, atol=1e-5, rtol=0)


def test_lora_bias_trains_a_bias_on_b_that_peft_loads_and_export_merges(tiny, tmp_path, capsys):
    from lorakit.io import read_adapter

    out = tmp_path / "bias"
    assert main(args(tiny, out, "--lora-bias", "--init", "kaiming", "--steps", "3", "--lr", "1e-2")) == 0
    config, tensors = read_adapter(out / "adapter")
    biases = {key: t for key, t in tensors.items() if key.endswith(".lora_B.bias")}
    assert config.lora_bias and len(biases) == 4 and all(t.abs().max() > 0 for t in biases.values())  # trained
    peft_and_export_agree(tiny, out, tmp_path / "merged")
    assert main(args(tiny, tmp_path / "no", "--lora-bias")) == 2
    assert "--lora-bias starts from --init kaiming" in capsys.readouterr().err
    assert main(args(tiny, tmp_path / "no", "--lora-bias", "--init", "kaiming", "--method", "full")) == 2
    assert "--lora-bias is for --method lora" in capsys.readouterr().err


def test_bias_all_trains_every_bias_beside_the_adapter_that_peft_loads_and_export_merges(tiny, tmp_path, capsys):
    """PEFT's bias="all" from the CLI, under bf16 too, where the frozen weights are stored in bf16 and a
    LayerNorm's trainable bias must keep its weight in fp32."""
    import torch
    from safetensors.torch import load_file

    from lorakit.io import read_adapter

    out = tmp_path / "biases"
    assert main(args(tiny, out, "--bias", "all", "--bf16", "--steps", "3", "--lr", "1e-2")) == 0
    config, tensors = read_adapter(out / "adapter")
    base = load_file(f"{tiny['cls']}/model.safetensors")
    biases = {key: t for key, t in tensors.items() if key.endswith(".bias") and ".lora_" not in key
              and "classifier" not in key}
    assert config.bias == "all" and len(biases) == sum(key.endswith(".bias") and "classifier" not in key
                                                       for key in base)
    moved = [key for key, t in biases.items() if not torch.equal(t, base[key.removeprefix("base_model.model.")
                                                                          .replace(".base_layer", "")])]
    assert len(moved) == len(biases)  # every bias trained, LayerNorms' included
    peft_and_export_agree(tiny, out, tmp_path / "merged")
    assert main(args(tiny, tmp_path / "no", "--bias", "all", "--method", "full")) == 2
    assert "--bias all is for --method lora, not 'full'" in capsys.readouterr().err


def test_rslora_and_modules_to_save_give_peft_s_keys_that_it_loads_and_export_merges(tiny, tmp_path, capsys):
    """--rslora (PEFT's use_rslora: alpha/sqrt(r)) and --modules-to-save (trained whole beside the task's head)."""
    import torch
    from safetensors.torch import load_file

    from lorakit.io import read_adapter

    out = tmp_path / "rs"
    assert main(args(tiny, out, "--rslora", "--modules-to-save", "pooler", "--steps", "3", "--lr", "1e-2")) == 0
    config, tensors = read_adapter(out / "adapter")
    assert config.use_rslora and config.modules_to_save == ["classifier", "pooler"]
    base = load_file(f"{tiny['cls']}/model.safetensors")["bert.pooler.dense.weight"]
    pooler = [t for key, t in tensors.items() if key.endswith("pooler.dense.weight")]
    assert len(pooler) == 1 and not torch.equal(pooler[0], base)  # saved whole, and trained
    peft_and_export_agree(tiny, out, tmp_path / "merged")
    assert main(args(tiny, tmp_path / "no", "--rslora", "--method", "full")) == 2
    assert "--rslora is for --method lora, not 'full'" in capsys.readouterr().err
    assert main(args(tiny, tmp_path / "no", "--modules-to-save", "nothing_here", "--steps", "1")) == 2
    error = capsys.readouterr().err.splitlines()[-1]  # after the model's loading bar: one line
    assert error.startswith("lorakit train: error: --modules-to-save nothing_here matched no module")


def test_target_parameters_train_a_mixture_of_experts_fused_experts_that_peft_loads(tiny, tmp_path, capsys):
    """`--target-parameters` (PEFT's target_parameters): one rank-r adapter per expert of the fused
    stacks, trained beside --targets, saved as PEFT lays it out."""
    import peft
    import torch
    from transformers import MixtralConfig, MixtralForCausalLM

    from lorakit.io import load_adapter, read_adapter
    from tiny_training import char_tokenizer

    tokenizer = char_tokenizer()
    torch.manual_seed(0)
    MixtralForCausalLM(MixtralConfig(
        vocab_size=128, hidden_size=32, intermediate_size=16, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, num_local_experts=4, num_experts_per_tok=2, max_position_embeddings=128,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id)).save_pretrained(tmp_path / "moe")
    tokenizer.save_pretrained(tmp_path / "moe")
    run = ["train", "--task", "chat", "--model", str(tmp_path / "moe"), "--data", tiny["chat"], "--steps", "3",
           "--batch-size", "4", "--max-length", "48", "--lr", "1e-2", "--targets", "q_proj"]
    experts = "experts.gate_up_proj,experts.down_proj"
    assert main([*run, "--target-parameters", experts, "--out", str(tmp_path / "run")]) == 0
    assert "LoRA on q_proj, gate_up_proj, down_proj (6 layers)" in capsys.readouterr().out
    config, tensors = read_adapter(tmp_path / "run" / "adapter")
    assert config.target_modules == ["q_proj"] and config.target_parameters == experts.split(",")
    moved = [key for key, t in tensors.items() if ".experts." in key and "lora_B" in key and t.abs().max() > 0]
    assert len(moved) == 4  # both stacks of both blocks trained (B starts at zero)
    ids = torch.tensor([[1, 5, 9, 17, 33, 40]])
    ours = load_adapter(MixtralForCausalLM.from_pretrained(tmp_path / "moe"), tmp_path / "run" / "adapter").eval()
    theirs = peft.PeftModel.from_pretrained(MixtralForCausalLM.from_pretrained(tmp_path / "moe"),
                                            tmp_path / "run" / "adapter").eval()
    with torch.no_grad():
        torch.testing.assert_close(theirs(input_ids=ids).logits, ours(input_ids=ids).logits, atol=1e-5, rtol=0)
    assert main([*run, "--target-parameters", experts, "--lora-dropout", "0.1", "--out", str(tmp_path / "no")]) == 2
    assert "cannot apply to target_parameters" in capsys.readouterr().err
    assert main([*run, "--target-parameters", "experts.nope", "--out", str(tmp_path / "no")]) == 2
    assert "['experts.nope'] matched no parameter" in capsys.readouterr().err


def load_classifier_with(adapter):
    from lorakit.io import load_adapter
    from lorakit.models import load_classifier

    config = json.loads((adapter / "adapter_config.json").read_text())
    model, tokenizer = load_classifier(config["base_model_name_or_path"])
    return load_adapter(model, adapter).eval(), tokenizer


def test_bad_input_is_one_line_and_exit_2(tiny, tmp_path, capsys):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "fine", "label": "a"}\n{"text": "oops"\n')
    assert main(["train", "--data", str(bad), "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("lorakit train: error: bad.jsonl line 2 is not valid JSON") and err.count("\n") == 1
    assert main(["eval", "--adapter", str(tmp_path / "nowhere")]) == 2
    assert "does not exist" in capsys.readouterr().err
    one_class = tmp_path / "one.csv"
    one_class.write_text("text,label\n" + "".join(f"review {i},pos\n" for i in range(30)))
    assert main(["train", "--data", str(one_class), "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert "has only the label 'pos'" in err and err.count("\n") == 1
    latin = tmp_path / "latin.csv"
    latin.write_bytes("text,label\ncaf\u00e9,pos\nbad,neg\n".encode("latin-1"))
    assert main(["train", "--data", str(latin), "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert "latin.csv is not UTF-8 text" in err and err.count("\n") == 1


def test_chat_train_and_generate(tiny, tmp_path, capsys):
    assert main(["train", "--task", "chat", "--model", tiny["llm"], "--data", tiny["chat"], "--steps", "3",
                 "--batch-size", "8", "--out", str(tmp_path / "chat")]) == 0
    capsys.readouterr()
    adapter = str(tmp_path / "chat" / "adapter")
    assert main(["generate", "--adapter", adapter, "--prompt", "say red", "--max-new-tokens", "4"]) == 0
    assert capsys.readouterr().out.startswith("[")
    assert main(["generate", "--adapter", adapter, "--adapter", adapter, "--merge", "--prompt", "hi",
                 "--max-new-tokens", "2"]) == 0
    assert "[merged] hi" in capsys.readouterr().out
    assert main(["generate", "--adapter", str(tmp_path / "chat"), "--prompt", "say red", "--max-new-tokens", "4"]) == 0
    assert capsys.readouterr().out.startswith("[chat_adapter] say red")
    assert main(["generate", "--adapter", str(tmp_path / "chat"), "say red", "--max-new-tokens", "4"]) == 0
    assert "say red" in capsys.readouterr().out  # a prompt given as predict takes its texts
    assert main(["generate", "--adapter", str(tmp_path / "chat")]) == 2
    assert "give a prompt" in capsys.readouterr().err
    # the base model alone, given a template (a run folder stands for the template its adapter carries)
    assert main(["generate", "--model", tiny["llm"], "--chat-template", "chatml", "--prompt", "hi",
                 "--max-new-tokens", "2"]) == 0
    assert "[base] hi" in capsys.readouterr().out
    assert main(["generate", "--model", tiny["llm"], "--chat-template", str(tmp_path / "chat"), "--prompt", "hi"]) == 2
    err = capsys.readouterr().err
    assert "neither a template name" in err and err.count("\n") == 1


def _run_until_checkpoint(command, out, sig):
    """Start `lorakit train` in a subprocess, send ``sig`` once a checkpoint exists."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    process = subprocess.Popen([sys.executable, "-m", "lorakit", *command], env=env, stdout=subprocess.PIPE,
                               stderr=subprocess.STDOUT, text=True)
    deadline = time.monotonic() + 240
    while not (out / "state" / "last" / "state.json").exists():
        assert process.poll() is None, process.stdout.read()
        assert time.monotonic() < deadline, "no checkpoint written"
        time.sleep(0.05)
    process.send_signal(sig)
    output, _ = process.communicate(timeout=240)
    return process.returncode, output


STEPS = ["--steps", "16", "--eval-every", "4", "--rank", "4", "--lr", "1e-2"]


@pytest.fixture(scope="module")
def whole_run(tiny):
    out = tiny["root"] / "whole"
    assert main(args(tiny, out, *STEPS)) == 0
    return out


@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGINT], ids=["kill", "ctrl-c"])
def test_a_killed_run_resumed_matches_the_uninterrupted_curve(tiny, whole_run, tmp_path, sig):
    parts = tmp_path / "parts"
    code, output = _run_until_checkpoint(args(tiny, parts, *STEPS), parts, sig)
    if sig == signal.SIGKILL:
        assert code == -signal.SIGKILL
    else:
        assert code == 130 and "--resume" in output, output
    stopped_at = json.loads((parts / "state" / "last" / "state.json").read_text())["step"]
    assert 0 < stopped_at < 16
    assert main(args(tiny, parts, *STEPS, "--resume")) == 0
    assert losses(parts) == pytest.approx(losses(whole_run), abs=1e-6)
    assert len(losses(parts)) == 16
    test, whole = (json.loads((folder / "report.json").read_text())["test"] for folder in (parts, whole_run))
    assert test.pop("classes") == whole.pop("classes")  # per-class scores and the confusion matrix
    assert test == pytest.approx(whole)


def test_a_folder_lorakit_did_not_write_is_refused_and_nothing_of_the_user_is_deleted(tiny, tmp_path, capsys):
    out = tmp_path / "mine"
    (out / "adapter").mkdir(parents=True)
    (out / "notes.txt").write_text("my notes")
    (out / "adapter" / "mine.txt").write_text("keep me")
    (out / "report.json").write_text("{}")
    assert main(args(tiny, out, "--steps", "2")) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "was not written by lorakit train" in err and "--overwrite" in err
    assert sorted(p.name for p in out.iterdir()) == ["adapter", "notes.txt", "report.json"]
    assert (out / "report.json").read_text() == "{}"

    assert main(args(tiny, out, "--steps", "2", "--overwrite")) == 0
    assert (out / "notes.txt").read_text() == "my notes"
    assert (out / "adapter" / "mine.txt").read_text() == "keep me"
    assert (out / "adapter" / "adapter_model.safetensors").is_file()
    assert json.loads((out / "report.json").read_text())["steps"] == 2  # a file of lorakit's name: replaced

    # the folder is now a run folder: reused without --overwrite, lorakit's files replaced, the user's kept
    assert main(args(tiny, out, "--steps", "3")) == 0
    assert json.loads((out / "report.json").read_text())["steps"] == 3
    assert (out / "notes.txt").read_text() == "my notes"
    assert (out / "adapter" / "mine.txt").read_text() == "keep me"
    assert sorted(p.name for p in (out / "adapter").iterdir()) == [
        "adapter_config.json", "adapter_model.safetensors", "lorakit_task.json", "mine.txt"]


@pytest.mark.slow  # compiles the tiny model's training and evaluation graphs with inductor
def test_compile_trains_to_the_eager_result(tiny, tmp_path):
    """`--compile` compiles the model in place: the same losses, validation and saved keys as eager."""
    common = ("--steps", "4", "--eval-every", "2", "--model-dropout", "0", "--no-bf16")
    assert main(args(tiny, tmp_path / "eager", *common)) == 0
    assert main(args(tiny, tmp_path / "compiled", *common, "--compile")) == 0
    assert losses(tmp_path / "compiled") == pytest.approx(losses(tmp_path / "eager"), abs=1e-5)
    reports = [json.loads((tmp_path / run / "report.json").read_text()) for run in ("eager", "compiled")]
    assert reports[1]["validation_after"]["loss"] == pytest.approx(reports[0]["validation_after"]["loss"], abs=1e-5)
    from safetensors.torch import load_file

    files = [load_file(str(tmp_path / run / "adapter" / "adapter_model.safetensors")) for run in ("eager", "compiled")]
    assert files[0].keys() == files[1].keys()


def test_adapter_folders_peft_wrote_are_used_by_generate_predict_and_eval(tiny, tmp_path, capsys):
    """A PEFT adapter folder (no lorakit_task.json): its task from task_type, its base from --model;
    a classifier's classes as the model's config names them (LABEL_i is also the data's i); eval needs --data."""
    import peft
    import torch
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer

    lm = peft.get_peft_model(AutoModelForCausalLM.from_pretrained(tiny["llm"]), peft.LoraConfig(
        r=4, target_modules=["q_proj"], init_lora_weights=False, task_type="CAUSAL_LM"))
    lm.save_pretrained(tmp_path / "lm")
    assert main(["generate", "--adapter", str(tmp_path / "lm"), "--model", tiny["llm"], "hi",
                 "--max-new-tokens", "3"]) == 0
    assert capsys.readouterr().out.startswith("[")
    assert main(["eval", "--adapter", str(tmp_path / "lm"), "--model", tiny["llm"]]) == 2
    assert "records no data it was trained on" in capsys.readouterr().err
    assert main(["eval", "--adapter", str(tmp_path / "lm"), "--model", tiny["llm"], "--data", tiny["chat"]]) == 0
    assert "loss" in capsys.readouterr().out
    classifier = AutoModelForSequenceClassification.from_pretrained(tiny["cls"])
    torch.manual_seed(0)
    theirs = peft.get_peft_model(classifier, peft.LoraConfig(r=4, target_modules=["query", "value"],
                                                               task_type="SEQ_CLS"))
    theirs.save_pretrained(tmp_path / "cls")
    assert main(["predict", "--adapter", str(tmp_path / "cls"), "--model", tiny["cls"], "a fine film"]) == 0
    assert list(classifier.config.id2label.values()) == ["LABEL_0", "LABEL_1"]  # transformers' placeholders
    assert capsys.readouterr().out.split()[0] in {"LABEL_0", "LABEL_1"}
    # eval: transformers' placeholder LABEL_i is the data's integer label i, as a Trainer's data holds it
    texts = ["a fine film", "dull and long", "moving", "a waste of time", "great fun", "boring", "superb", "bad"]
    rows = [{"text": t, "label": i % 2} for i, t in enumerate(texts)]
    write_jsonl(tmp_path / "scored.jsonl", rows)
    theirs.eval()
    with torch.no_grad():
        batch = AutoTokenizer.from_pretrained(tiny["cls"])(texts, return_tensors="pt", padding=True)
        answers = theirs(**batch).logits.argmax(-1).tolist()
    want = sum(a == r["label"] for a, r in zip(answers, rows)) / len(rows)
    assert main(["eval", "--adapter", str(tmp_path / "cls"), "--model", tiny["cls"],
                 "--data", str(tmp_path / "scored.jsonl")]) == 0
    assert f"accuracy {want:.4f}" in capsys.readouterr().out
    write_jsonl(tmp_path / "named.jsonl", [{"text": t, "label": "pos"} for t in texts])
    assert main(["eval", "--adapter", str(tmp_path / "cls"), "--model", tiny["cls"],
                 "--data", str(tmp_path / "named.jsonl")]) == 2
    assert "has label 'pos', which the model does not know" in capsys.readouterr().err
    # a kind of adapter the commands do not run, and a model of a kind the task cannot load: one line each
    from transformers import AutoModelForTokenClassification, T5Config, T5ForConditionalGeneration

    tagger = peft.get_peft_model(AutoModelForTokenClassification.from_pretrained(tiny["cls"]),
                                 peft.LoraConfig(r=4, target_modules=["query"], task_type="TOKEN_CLS"))
    tagger.save_pretrained(tmp_path / "tagger")
    assert main(["predict", "--adapter", str(tmp_path / "tagger"), "--model", tiny["cls"], "a fine film"]) == 2
    assert "a PEFT adapter of task_type 'TOKEN_CLS'" in capsys.readouterr().err
    T5ForConditionalGeneration(T5Config(vocab_size=128, d_model=16, d_ff=32, num_layers=1, num_heads=2,
                                        d_kv=8)).save_pretrained(tmp_path / "t5")
    assert main(["generate", "--model", str(tmp_path / "t5"), "hi"]) == 2
    err = capsys.readouterr().err
    assert "need a causal (decoder-only) language model" in err and "Model type should be one of" not in err
