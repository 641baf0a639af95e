"""Export an adapter merged into its base as a plain transformers model folder.

``export_merged(adapter, out)`` loads the base the adapter records (``lorakit_task.json``
of a folder ``lorakit train`` wrote, else ``base_model_name_or_path`` of a PEFT
``adapter_config.json``; ``model=`` overrides it) from its own weights in fp32 — never a
quantized copy: after QLoRA training the adapter is merged into the original
full-precision base, as the QLoRA paper's practice is — adds ``ΔW = s·B·A`` in fp32,
casts once to the chosen dtype, and writes ``config.json``, the weights and the
tokenizer, which ``AutoModel*.from_pretrained(out)`` loads without lorakit.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from lorakit import atomic
from lorakit.errors import LorakitError

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def export_merged(adapter, out, model: str | None = None, dtype: str | None = None) -> dict:
    """Write the base model with ``adapter`` merged into it to the folder ``out``.

    Args:
        adapter: an adapter folder (written by ``lorakit train`` or by PEFT), or a run folder of
            ``lorakit train``.
        out: the folder to create; it must not exist or be empty.
        model: the base model (a folder, ``default``, ``default-chat``); default: the one
            the adapter records.
        dtype: ``"fp32"``, ``"bf16"`` or ``"fp16"``; default: the base's own (its config's
            ``dtype``, else fp32).

    Returns:
        ``{"out", "model", "dtype", "class", "bytes"}``.

    Raises:
        LorakitError: no base recorded and none given, ``out`` holds files, an unknown dtype,
            or the adapter does not fit the base.
    """
    from lorakit.run_folder import adapter_folder
    from lorakit.targets import CAUSAL_LM, model_kind

    adapter, out = adapter_folder(adapter), Path(out)  # a run folder of lorakit train stands for its adapter/
    if dtype is not None and dtype not in DTYPES:
        raise LorakitError(f"dtype {dtype!r} is unknown; choose one of {sorted(DTYPES)}")
    atomic.check_new_folder(out, "the merged model", "--merged")
    spec = model or recorded_base(adapter)
    net, tokenizer = _merged(adapter, spec, model)
    if spec == "default" and model_kind(net) == CAUSAL_LM:
        spec = "default-chat"  # a language-model task's "default" is the embedded chat model
    target = DTYPES[dtype] if dtype else base_dtype(spec)
    net = net.to(target)

    def write(folder: Path) -> None:
        net.save_pretrained(folder)
        if tokenizer is not None:
            tokenizer.save_pretrained(folder)

    from lorakit.atomic import replace_folder

    replace_folder(out, write)
    size = sum(f.stat().st_size for f in out.rglob("*") if f.is_file())
    return {"out": str(out), "model": spec, "dtype": str(target).removeprefix("torch."),
            "class": type(net).__name__, "bytes": size}


def recorded_base(adapter: Path) -> str:
    """The base model an adapter folder names: ``lorakit_task.json``'s ``model``, else
    ``adapter_config.json``'s ``base_model_name_or_path``.

    Raises:
        LorakitError: the folder is not an adapter, or names no base.
    """
    from lorakit.run_folder import TASK_FILE

    if not (adapter / "adapter_config.json").is_file():
        raise LorakitError(f"{adapter} holds no adapter_config.json; give an adapter folder (lorakit train writes "
                           "one under --out/adapter)")
    task_file = adapter / TASK_FILE
    if task_file.is_file():
        return json.loads(task_file.read_text())["model"]
    base = json.loads((adapter / "adapter_config.json").read_text()).get("base_model_name_or_path")
    if not base:
        raise LorakitError(f"{adapter} does not record its base model; give it with --model")
    return base


def base_dtype(spec: str) -> torch.dtype:
    """The dtype a base model's config records (``dtype`` / ``torch_dtype``), fp32 if none."""
    from lorakit.models import load_model_config

    config = load_model_config(spec)
    recorded = getattr(config, "dtype", None) or getattr(config, "torch_dtype", None)
    if isinstance(recorded, str):
        recorded = getattr(torch, recorded, None)
    return recorded if isinstance(recorded, torch.dtype) and recorded.is_floating_point else torch.float32


def _merged(adapter: Path, spec: str, override: str | None):
    """``(merged model, tokenizer)``: the base in fp32 with the adapter merged in."""
    from lorakit.run_folder import TASK_FILE

    if (adapter / TASK_FILE).is_file():  # the task knows the model class and the labels
        from lorakit.inference import load_trained

        trained = load_trained([adapter], merge=True, model=override)
        return trained.model, trained.tokenizer
    from lorakit.io import load_adapter
    from lorakit.merging import merge_and_unload
    from lorakit.models import load_model

    net, tokenizer = load_model(spec)
    load_adapter(net.float(), adapter)
    return merge_and_unload(net), tokenizer
