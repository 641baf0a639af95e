"""GGUF model files (the embedded SmolLM2 ships as one): dequantized to fp32 once and saved as
a plain safetensors folder, so later loads are plain ``from_pretrained`` calls.

transformers dequantizes a GGUF file on every load (~15 s) and refuses to ``save_pretrained``
the result (it marks the model quantized though its tensors are fp32); :func:`convert_gguf`
rebuilds a plain model from the same tensors and writes it atomically.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import torch
from torch import nn

from lorakit.errors import LorakitError


SAMPLE_BYTES = 8 << 20  # read from each end of a GGUF file to key its conversion
SOURCE_FILE = "lorakit_gguf_source.json"  # in a conversion: the GGUF file it was made from


def converted_dir(gguf: Path, cache: Path) -> Path:
    """Folder under ``cache`` for the fp32 safetensors conversion of ``gguf``.

    Keyed by what the file holds (its size, its first and last 8 MiB: the header with
    the metadata and tokenizer, and the last tensors), not by where it lies or when it
    was written: the same model installed in two environments shares one conversion,
    and a changed file (a new package version) is converted again. Reading the ends
    keeps the key quick for a file of many GB.
    """
    size = gguf.stat().st_size
    digest = hashlib.sha1(f"{size}:".encode())
    with open(gguf, "rb") as fh:
        digest.update(fh.read(SAMPLE_BYTES))
        fh.seek(max(SAMPLE_BYTES, size - SAMPLE_BYTES))  # the last 8 MiB, or what the first did not read
        digest.update(fh.read())
    return cache / f"{gguf.stem}-fp32-{digest.hexdigest()[:10]}"


def convert_gguf(gguf: Path, dest: Path):
    """Dequantize ``gguf`` to fp32 and save it as a safetensors model folder at ``dest``.

    Returns the loaded ``(model, tokenizer)``. The folder is written under a temporary
    name beside ``dest`` and renamed at the end, so an interrupted conversion never
    leaves a half-written folder behind; if another process finished first, its
    folder is kept. Then the conversions no file holds any more (:func:`stale_conversions`:
    a new package version's model replaced the one they were made from) are removed.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    print(f"lorakit: converting {gguf.name} to fp32 safetensors in {dest} (once; ~20 s)",
          file=sys.stderr, flush=True)
    started = time.perf_counter()
    try:
        loaded = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
        tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    except ImportError as err:
        raise LorakitError(f"reading {gguf.name} needs the gguf package: pip install gguf ({err})") from err
    except Exception as err:  # the GGUF reader raises struct, KeyError, ValueError ... on a bad file
        raise LorakitError(f"cannot read the GGUF file {gguf} ({type(err).__name__}: {err}); "
                           "check that it is a complete GGUF model of an architecture transformers knows") from err
    model = _dequantized_copy(loaded)
    del loaded
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}.", dir=dest.parent))
    try:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        (tmp / SOURCE_FILE).write_text(json.dumps({"gguf": str(gguf.resolve())}))
        try:
            os.rename(tmp, dest)
        except OSError:
            if not dest.is_dir():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    print(f"lorakit: converted in {time.perf_counter() - started:.1f} s", file=sys.stderr, flush=True)
    for stale in stale_conversions(gguf, dest.parent):
        size = sum(f.stat().st_size for f in stale.rglob("*") if f.is_file())
        shutil.rmtree(stale, ignore_errors=True)
        print(f"lorakit: removed {stale} ({size / 1e9:.2f} GB), the conversion of a {gguf.name} that is gone "
              "or has changed", file=sys.stderr, flush=True)
    return model, tokenizer


def stale_conversions(gguf: Path, cache: Path) -> list[Path]:
    """The conversions in ``cache`` of files named as ``gguf`` that no file holds any more: each
    records the file it was made from, which is gone or now holds other content (its key,
    :func:`converted_dir`, names another folder). A conversion whose file still holds it (the
    same model in another environment) is kept, and so is one without a record."""
    stale = []
    for folder in sorted(cache.glob(f"{gguf.stem}-fp32-*")):
        try:
            source = Path(json.loads((folder / SOURCE_FILE).read_text())["gguf"])
        except (OSError, ValueError, KeyError, TypeError):
            continue  # a temporary folder, or no record: not known to be stale
        if not source.is_file() or converted_dir(source, cache) != folder:
            stale.append(folder)
    return stale


def _dequantized_copy(loaded: nn.Module) -> nn.Module:
    """A plain (not "GGUF-quantized") model holding ``loaded``'s fp32 weights.

    transformers marks a model read from GGUF as quantized and refuses to save it,
    though its tensors are already plain fp32; a fresh model built from the same
    config without ``quantization_config`` takes the very same tensors.
    """
    from transformers import AutoModelForCausalLM

    config = loaded.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(loaded.state_dict(), assign=True, strict=False)
    model.tie_weights()
    # Non-persistent buffers (rotary inv_freq) are not in the state dict.
    loaded_buffers = dict(loaded.named_buffers())
    for name, buffer in list(model.named_buffers()):
        if buffer.is_meta and name in loaded_buffers:
            owner, _, attr = name.rpartition(".")
            model.get_submodule(owner)._buffers[attr] = loaded_buffers[name]
    tensors = [*model.named_parameters(), *model.named_buffers()]
    missing = [name for name, t in tensors if t.is_meta]
    if missing:
        raise LorakitError(f"the GGUF file lacks weights for {missing[:5]}; it cannot be converted")
    model.generation_config = loaded.generation_config
    return model.eval()
