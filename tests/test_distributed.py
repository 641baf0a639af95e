"""`torchrun --nproc_per_node=2 -m lorakit train` on CPU (gloo): two processes with half the
batch each train the very same adapter as one process with the whole batch, whether each
holds the whole model (DDP) or half of it (``--fsdp``)."""

import json
import os
import subprocess
import sys

import pytest
import torch
import torch.distributed as dist
from safetensors import safe_open
from safetensors.torch import load_file

from lorakit import LoraConfig, attach, distributed
from lorakit.io import save_adapter
from lorakit.report import read_metrics
from lorakit.targets import CAUSAL_LM, architecture_name, model_fingerprint, model_kind
from lorakit.train import TrainConfig, train
from tiny_models import tiny_llama
from tiny_training import chat_records, save_tiny_classifier, save_tiny_llama, write_jsonl


def test_two_cpu_processes_equal_one_with_the_same_global_batch(tmp_path):
    model = str(save_tiny_classifier(tmp_path / "cls"))  # dropout 0: both runs see the same function
    common = ["--model", model, "--data-limit", "200", "--steps", "4", "--eval-every", "4", "--max-length", "48",
              "--lr", "1e-2", "--no-bf16"]  # fp32: the equality is exact up to summation order
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    done = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "lorakit",
         "train", *common, "--batch-size", "4", "--out", str(tmp_path / "ddp")],
        env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    train(TrainConfig(model=model, data_limit=200, steps=4, eval_every=4, max_length=48, lr=1e-2, batch_size=8,
                      bf16=False, out=str(tmp_path / "one"), progress=False))

    two = load_file(str(tmp_path / "ddp" / "adapter" / "adapter_model.safetensors"))
    one = load_file(str(tmp_path / "one" / "adapter" / "adapter_model.safetensors"))
    assert set(two) == set(one)
    for key in one:
        assert torch.allclose(two[key], one[key], atol=1e-5, rtol=0), key
    assert any(float(one[k].abs().max()) > 0 for k in one if "lora_B" in k)  # it did train

    lines = read_metrics(tmp_path / "ddp" / "metrics.jsonl")  # only rank 0 wrote: each step once
    steps = [line["step"] for line in lines if "lr" in line]
    assert steps == [1, 2, 3, 4]
    ddp_loss = [line["loss"] for line in lines if "lr" in line]
    one_loss = [line["loss"] for line in read_metrics(tmp_path / "one" / "metrics.jsonl") if "lr" in line]
    assert ddp_loss == pytest.approx(one_loss, abs=1e-5)
    report = (tmp_path / "ddp" / "report.json").read_text()
    assert '"world_size": 2' in report and '"global_batch": 8' in report


# ---------------------------------------------------------------- FSDP


@pytest.fixture
def process_group_of_one(tmp_path):
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'rendezvous'}", rank=0, world_size=1)
    yield distributed.Runtime(0, 1, torch.device("cpu"), sharded=True)
    dist.destroy_process_group()


def adapter_metadata(folder) -> dict:
    with safe_open(str(folder / "adapter_model.safetensors"), "pt") as f:
        return f.metadata()


def test_a_sharded_model_is_saved_as_the_model_it_was(process_group_of_one, tmp_path):
    model = attach(tiny_llama(), LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init="random"))
    fingerprint = model_fingerprint(model)
    save_adapter(model, tmp_path / "plain")

    assert distributed.shard(model, process_group_of_one) == ["model.layers.0", "model.layers.1"]
    assert distributed.is_sharded(model) and type(model).__name__ == "FSDPLlamaForCausalLM"
    assert (architecture_name(model), model_kind(model), model_fingerprint(model)) == \
        ("LlamaForCausalLM", CAUSAL_LM, fingerprint)
    sliced = model.model.layers[0].self_attn.q_proj.adapters["default"].A
    assert type(sliced).__name__ == "DTensor"
    with distributed.whole_trainable_parameters(model):
        assert type(model.model.layers[0].self_attn.q_proj.adapters["default"].A) is torch.nn.Parameter
        save_adapter(model, tmp_path / "sharded")
    assert model.model.layers[0].self_attn.q_proj.adapters["default"].A is sliced  # the slice is back

    saved, expected = (load_file(str(tmp_path / f / "adapter_model.safetensors")) for f in ("sharded", "plain"))
    assert set(saved) == set(expected) and all(torch.equal(saved[k], expected[k]) for k in expected)
    assert adapter_metadata(tmp_path / "sharded") == adapter_metadata(tmp_path / "plain")


FSDP_RUN = {"task": "chat", "steps": 4, "eval_every": 2, "lr": 1e-2, "targets": "all-linear", "bf16": False,
            "progress": False}  # fp32: equal up to summation order
LAUNCH = """import json, sys
from lorakit.train import TrainConfig, TrainingInterrupted, train
try:
    train(TrainConfig(**json.loads(sys.argv[1])))
except TrainingInterrupted:
    pass
"""


def torchrun(tmp_path, config: dict, processes: int = 2) -> None:
    """``train(TrainConfig(**config))`` in ``processes`` CPU processes under torchrun (gloo)."""
    launcher = tmp_path / "launch.py"
    launcher.write_text(LAUNCH)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    done = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={processes}",
         str(launcher), json.dumps(config)], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]


@pytest.fixture(scope="module")
def chat_run(tmp_path_factory):
    """A tiny Llama, chat data, and the one-process run with a global batch of 8: the reference."""
    root = tmp_path_factory.mktemp("fsdp")
    common = {**FSDP_RUN, "model": str(save_tiny_llama(root / "llm")),
              "data": str(write_jsonl(root / "chat.jsonl", chat_records(60)))}
    train(TrainConfig(**common, batch_size=8, out=str(root / "one")))
    return common, root / "one"


def adapter_tensors(run_folder) -> dict:
    return load_file(str(run_folder / "adapter" / "adapter_model.safetensors"))


def assert_same_adapter(run_folder, reference) -> None:
    got, want = adapter_tensors(run_folder), adapter_tensors(reference)
    assert set(got) == set(want)
    for key in want:
        assert torch.allclose(got[key], want[key], atol=1e-5, rtol=0), (key, float((got[key] - want[key]).abs().max()))
    assert any(float(want[k].abs().max()) > 0 for k in want if "lora_B" in k)  # it did train


def test_fsdp_over_two_cpu_processes_equals_one_process(chat_run, tmp_path):
    common, one = chat_run
    model, data = common["model"], common["data"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    done = subprocess.run(  # the command line a user types; 2 processes x 2 micro-batches x 2 = 8 a step
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "lorakit",
         "train", "--task", "chat", "--model", model, "--data", data, "--steps", "4", "--eval-every", "2",
         "--lr", "1e-2", "--targets", "all-linear", "--no-bf16", "--batch-size", "2", "--grad-accum", "2",
         "--fsdp", "--out", str(tmp_path / "fsdp")],
        env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "fsdp: sharded over 2 processes, 2 blocks" in done.stdout
    assert_same_adapter(tmp_path / "fsdp", one)
    assert adapter_metadata(tmp_path / "fsdp" / "adapter") == adapter_metadata(one / "adapter")

    lines = read_metrics(tmp_path / "fsdp" / "metrics.jsonl")  # only rank 0 wrote: each step once
    assert [line["step"] for line in lines if "lr" in line] == [1, 2, 3, 4]
    one_lines = read_metrics(one / "metrics.jsonl")
    assert [line["loss"] for line in lines if "lr" in line] == \
        pytest.approx([line["loss"] for line in one_lines if "lr" in line], abs=1e-5)
    assert [line["loss"] for line in lines if line.get("split") == "validation"] == \
        pytest.approx([line["loss"] for line in one_lines if line.get("split") == "validation"], abs=1e-5)
    assert sorted(p.name for p in (tmp_path / "fsdp").iterdir()) == sorted(p.name for p in one.iterdir())
    report = json.loads((tmp_path / "fsdp" / "report.json").read_text())
    assert (report["world_size"], report["fsdp"], report["global_batch"]) == (2, True, 8)

    # the checkpoint holds whole tensors, as one process's does: the same keys and shapes
    state = load_file(str(tmp_path / "fsdp" / "state" / "last" / "state.safetensors"))
    one_state = load_file(str(one / "state" / "last" / "state.safetensors"))
    assert set(state) == set(one_state) | {"rng.1.torch"}
    for key in one_state:
        if not key.startswith("rng."):
            assert state[key].shape == one_state[key].shape, key
            assert torch.allclose(state[key].float(), one_state[key].float(), atol=1e-5, rtol=0), key


def test_a_checkpoint_written_under_fsdp_resumes_to_the_same_adapter(chat_run, tmp_path):
    common, one = chat_run
    config = {**common, "batch_size": 4, "fsdp": True, "out": str(tmp_path / "fsdp")}
    torchrun(tmp_path, {**config, "stop_after": 2})
    meta = json.loads((tmp_path / "fsdp" / "state" / "last" / "state.json").read_text())
    assert meta["step"] == 2

    torchrun(tmp_path, {**config, "resume": True})
    assert_same_adapter(tmp_path / "fsdp", one)
    steps = [line["step"] for line in read_metrics(tmp_path / "fsdp" / "metrics.jsonl") if "lr" in line]
    assert steps == [1, 2, 3, 4]


def test_the_flag_given_sets_the_precision_else_the_device_does():
    cpu = torch.device("cpu")
    assert distributed.run_in_bf16(True, cpu) is True and distributed.run_in_bf16(False, cpu) is False
    assert distributed.run_in_bf16(None, cpu) == distributed.native_bf16(cpu)
    assert distributed.run_in_bf16(None, torch.device("meta")) is False  # no bf16 arithmetic there


def test_trainable_tokens_over_two_cpu_processes_equal_one_process(chat_run, tmp_path):
    """DDP with token rows (--trainable-tokens) beside the adapter, on a tied head: the rows'
    gradients are averaged as the factors' are, so two processes end where one does; a token
    the batches never hold (99) keeps its row."""
    common, _ = chat_run
    config = {**common, "targets": ["q_proj", "v_proj"], "trainable_tokens": [5, 6, 99]}
    train(TrainConfig(**config, batch_size=8, out=str(tmp_path / "one")))
    torchrun(tmp_path, {**config, "batch_size": 4, "out": str(tmp_path / "two")})
    assert_same_adapter(tmp_path / "two", tmp_path / "one")
    from transformers import AutoModelForCausalLM

    rows = [t for key, t in adapter_tensors(tmp_path / "two").items() if key.endswith("trainable_tokens_delta")]
    base = AutoModelForCausalLM.from_pretrained(common["model"]).get_input_embeddings().weight[[5, 6, 99]]
    assert len(rows) == 1 and (rows[0][:2] - base[:2]).abs().max() > 1e-4  # trained, where the tokens occur
