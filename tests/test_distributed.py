"""`torchrun --nproc_per_node=2 -m lorakit train` on CPU (gloo): two processes with half the
batch each train the very same adapter as one process with the whole batch."""

import os
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from lorakit.report import read_metrics
from lorakit.train import TrainConfig, train
from tiny_training import save_tiny_classifier


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
