"""What the server's end-to-end tests share: a real ``lorakit serve`` in a subprocess on a
free loopback port, a toy model with random adapters, and each adapter's greedy answer
computed without lorakit.

The base is a tiny random-weight Llama with a byte-level BPE tokenizer built offline
(:mod:`lorakit.serve.toy`); the adapters are random rank-8 LoRA files in PEFT's format.
What each adapter gives "alone" is computed here independently of lorakit: the adapter's
ΔW = (α/r)·B·A is added into a plain transformers model's weights and greedy decoding
runs it with a KV cache.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
import torch
from safetensors.torch import load_file

from lorakit.serve.toy import write_random_adapter, write_toy_model

PROMPTS = ["Customers can select", "The quick brown fox jumps over", "Hello!", "Write a SQL query that counts",
           "One foundational model can exchange matrices for", "Low-rank", "Summarise this", "fox"]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class Server:
    """``python -m lorakit serve ...`` in a subprocess; stopped (SIGINT, then kill) at the end."""

    def __init__(self, args: list[str], log: Path, env: dict | None = None):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = log
        env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1", **(env or {})}
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "lorakit", "serve", "--port", str(self.port), "--log-level", "warning", *args],
            stdout=log.open("w"), stderr=subprocess.STDOUT, env=env)
        deadline = time.monotonic() + 90
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited with {self.proc.returncode}:\n{log.read_text()}")
            try:
                if httpx.get(self.url + "/health", timeout=1).status_code == 200:
                    return
            except httpx.HTTPError:
                time.sleep(0.2)
        self.stop()
        raise RuntimeError(f"server did not start:\n{log.read_text()}")

    def __enter__(self) -> "Server":
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    def stop(self, sig=signal.SIGINT, timeout: float = 30) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        return self.proc.returncode


def make_toy(tmp: Path, n_adapters: int = 8, **model_size) -> dict:
    """A toy model folder, an adapter root with ``n_adapters`` adapters (``task0``...) and a
    broken one, and their "alone" references. ``model_size``: ``layers``, ``hidden``."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model_dir = write_toy_model(tmp / "model", **model_size)
    model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    root = tmp / "adapters"
    root.mkdir()
    names = [f"task{i}" for i in range(n_adapters)]
    for i, name in enumerate(names):
        write_random_adapter(model, root / name, seed=100 + i, r=8)
    broken = root / "broken"  # a config with a weights file that is not safetensors
    write_random_adapter(model, broken, seed=99, r=8)
    (broken / "adapter_model.safetensors").write_bytes(b"not a safetensors file")
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    return {"tmp": tmp, "model_dir": model_dir, "root": root, "names": names, "tokenizer": tokenizer,
            "refs": References(model_dir, tokenizer)}


class References:
    """Greedy answers of the base model with one adapter merged in, computed without lorakit."""

    def __init__(self, model_dir: Path, tokenizer):
        self.model_dir, self.tokenizer, self.models, self.cache = model_dir, tokenizer, {}, {}

    def model(self, adapter_dir: Path | None):
        from transformers import AutoModelForCausalLM

        if adapter_dir not in self.models:
            model = AutoModelForCausalLM.from_pretrained(self.model_dir).eval()
            if adapter_dir is not None:
                config = json.loads((adapter_dir / "adapter_config.json").read_text())
                tensors = load_file(str(adapter_dir / "adapter_model.safetensors"))
                scaling = config["lora_alpha"] / config["r"]
                with torch.no_grad():
                    for key, a in tensors.items():
                        if key.endswith(".lora_A.weight"):
                            path = key[len("base_model.model."):-len(".lora_A.weight")]
                            b = tensors[key.replace("lora_A", "lora_B")]
                            model.get_submodule(path).weight += scaling * b @ a
            self.models[adapter_dir] = model
        return self.models[adapter_dir]

    def text(self, adapter_dir: Path | None, prompt_ids: list[int], max_tokens: int) -> str:
        key = (adapter_dir, tuple(prompt_ids), max_tokens)
        if key not in self.cache:
            model, ids, new, cache = self.model(adapter_dir), torch.tensor([prompt_ids]), [], None
            threads = torch.get_num_threads()
            torch.set_num_threads(1)  # tiny matmuls: more threads only wait on each other
            try:
                with torch.inference_mode():  # greedy decoding, batch of one, with a KV cache
                    for _ in range(max_tokens):
                        out = model(input_ids=ids, past_key_values=cache, use_cache=True)
                        cache, token = out.past_key_values, int(out.logits[0, -1].argmax())
                        if token == self.tokenizer.eos_token_id:
                            break
                        new.append(token)
                        ids = torch.tensor([[token]])
            finally:
                torch.set_num_threads(threads)
            self.cache[key] = self.tokenizer.decode(new, skip_special_tokens=True)
        return self.cache[key]




def error_of(response, status: int) -> dict:
    """The ``error`` object of an answer that must have ``status``."""
    assert response.status_code == status, response.text
    return response.json()["error"]


def complete(url: str, model: str, prompt: str, max_tokens: int, headers=None, **extra) -> dict:
    """A greedy (unless ``extra`` says otherwise) completion that must succeed."""
    answer = httpx.post(url + "/v1/completions", timeout=60, headers=headers,
                        json={"model": model, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0, **extra})
    assert answer.status_code == 200, answer.text
    return answer.json()
