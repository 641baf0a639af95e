"""Training checkpoints: everything needed to continue a run exactly where it stopped.

A checkpoint is a folder of two files, never pickle:

- ``state.safetensors``: the trainable parameters (by their names in the model), the
  optimizer's tensors (``optimizer.<param index>.<key>``: AdamW's ``exp_avg``,
  ``exp_avg_sq``, ``step``), each process's torch random state (``rng.<rank>.torch``,
  ``rng.<rank>.cuda.<device>``) and what the method keeps beside its parameters
  (``method.<name>``: AdaLoRA's importance and masks, :class:`lorakit.methods.Method`).
- ``state.json``: the step, the best metric so far, the learning-rate scheduler's
  state, the optimizer's hyper-parameters, Python's random state per rank, and the
  settings of the run (a resume with different settings is refused).

The tensors are whole whether the run was sharded with FSDP or not (the caller gathers
them, :mod:`lorakit.distributed`), so a checkpoint resumes under DDP, FSDP or one process
alike. The folder is written whole under a temporary name and swapped in
(:func:`lorakit.atomic.replace_folder`), so a crash at any moment leaves either the old
checkpoint or the new one, never half of one. :func:`stop_on_signals` turns Ctrl-C and SIGTERM into a
request to stop at the end of the current step, so that a checkpoint can be written.
"""

from __future__ import annotations

import json
import random
import signal
import threading
from contextlib import contextmanager
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from lorakit import atomic, distributed
from lorakit.errors import LorakitError

TENSORS = "state.safetensors"
META = "state.json"


# ---------------------------------------------------------------- tensors


def save_tensors(tensors: dict, path) -> None:
    """A safetensors file of ``tensors`` (moved to the CPU), written atomically."""
    with atomic.writing(path) as tmp:
        save_file({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, str(tmp))


def load_tensors(model, path) -> None:
    """Copy the tensors of the safetensors file ``path`` into ``model``'s parameters of
    the same names (what :func:`save_tensors` wrote); nothing if there is no file. A
    model sharded with FSDP keeps each process's slice (every process calls it)."""
    if not Path(path).is_file():
        return
    saved = load_file(str(path))
    names = {name for name, _ in model.named_parameters()}
    distributed.load_trainable_state(model, {name: t for name, t in saved.items() if name in names})


# ---------------------------------------------------------------- random states


def rng_state() -> dict:
    """This process's random states: torch CPU, every CUDA device, Python's ``random``."""
    state = {"torch": torch.get_rng_state(), "python": random.getstate()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    if state.get("cuda") and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


# ---------------------------------------------------------------- save / load


def save_checkpoint(folder, params: dict, optimizer_state: dict, scheduler, rng_states: list[dict],
                    meta: dict, method_state: dict | None = None) -> Path:
    """Write the training state (see the module docstring) atomically to ``folder``.

    Args:
        params: the trainable parameters by name, whole
            (:func:`lorakit.distributed.trainable_state`).
        optimizer_state: the optimizer's ``state_dict()`` with whole tensors
            (:func:`lorakit.distributed.optimizer_state`).
        rng_states: :func:`rng_state` of every process, by rank.
        meta: JSON-able facts of the run (step, best metric, settings, ...).
        method_state: the method's own tensors beside its parameters, by name.
    """
    tensors = {f"param.{name}": p for name, p in params.items()}
    tensors.update({f"method.{name}": t for name, t in (method_state or {}).items()})
    opt = optimizer_state
    for index, param_state in opt["state"].items():
        for key, value in param_state.items():
            tensors[f"optimizer.{index}.{key}"] = value if torch.is_tensor(value) else torch.tensor(value)
    pythons = []
    for rank, state in enumerate(rng_states):
        tensors[f"rng.{rank}.torch"] = state["torch"]
        for device, cuda_state in enumerate(state.get("cuda", [])):
            tensors[f"rng.{rank}.cuda.{device}"] = cuda_state
        version, internal, gauss = state["python"]
        pythons.append([version, list(internal), gauss])
    meta = {**meta, "optimizer_param_groups": opt["param_groups"], "scheduler": scheduler.state_dict(),
            "rng_python": pythons}

    def write(tmp: Path):
        save_tensors(tensors, tmp / TENSORS)
        atomic.write_json(tmp / META, meta, default=_jsonable)

    return atomic.replace_folder(folder, write)


def read_meta(folder) -> dict:
    """The ``state.json`` of the checkpoint in ``folder`` (to check settings before loading).

    Raises:
        LorakitError: no checkpoint in ``folder``.
    """
    found = atomic.existing_folder(folder)
    if found is None or not (found / TENSORS).is_file() or not (found / META).is_file():
        raise LorakitError(f"no checkpoint to resume in {folder}; run without --resume to start, "
                           "or give the --out of the run to continue")
    return json.loads((found / META).read_text())


def check_settings(folder, settings: dict, data_fingerprint: str | None = None) -> None:
    """Refuse to resume the checkpoint in ``folder`` with other ``settings`` than it was made with, or
    on a data file whose ``data_fingerprint`` (:func:`lorakit.data.files.file_fingerprint`) changed.

    Raises:
        LorakitError: no checkpoint, settings that differ (each change is listed), a data file changed.
    """
    meta = read_meta(folder)
    recorded = meta.get("data_fingerprint")
    if recorded is not None and data_fingerprint is not None and recorded != data_fingerprint:
        raise LorakitError(f"the data file {meta['settings'].get('data')} changed since the checkpoint in {folder} "
                           "was made; resume with the file as it was, or drop --resume to start afresh")
    saved = meta["settings"]
    changed = {k: (saved.get(k), v) for k, v in settings.items() if saved.get(k) != v}
    if changed:
        listed = ", ".join(f"{k}: {a!r} -> {b!r}" for k, (a, b) in changed.items())
        raise LorakitError(f"the checkpoint in {folder} was made with other settings ({listed}); resume with the "
                           "same flags, or drop --resume to start afresh")


def load_checkpoint(folder, model, optimizer, scheduler, rank: int = 0) -> dict:
    """Restore what :func:`save_checkpoint` wrote into ``model``, ``optimizer``,
    ``scheduler`` and this process's random state; return the meta dict, with the
    method's own tensors under ``"method_state"``. A model sharded with FSDP takes its
    slice (every process calls it).

    Raises:
        LorakitError: no checkpoint in ``folder``, or it does not fit the model.
    """
    meta = read_meta(folder)
    found = atomic.existing_folder(folder)
    tensors = load_file(str(found / TENSORS))

    params = {name: p for name, p in model.named_parameters() if p.requires_grad}
    saved = {key[len("param."):] for key in tensors if key.startswith("param.")}
    misfit = [name for name in saved & set(params) if tensors[f"param.{name}"].shape != params[name].shape]
    if saved != set(params) or misfit:
        missing, extra = sorted(set(params) - saved)[:5], sorted(saved - set(params))[:5]
        raise LorakitError(f"the checkpoint in {found} does not fit this model's trainable parameters "
                           f"(missing {missing}, unexpected {extra}, other shape {misfit[:5]}); resume with the settings it was made with")
    distributed.load_trainable_state(model, {name: tensors[f"param.{name}"] for name in params})

    opt_state: dict = {}
    for key, value in tensors.items():
        if key.startswith("optimizer."):
            _, index, name = key.split(".", 2)
            opt_state.setdefault(int(index), {})[name] = value
    distributed.load_optimizer_state(model, optimizer, {"state": opt_state,
                                                        "param_groups": meta.pop("optimizer_param_groups")})
    scheduler.load_state_dict(meta.pop("scheduler"))

    pythons = meta.pop("rng_python")
    if rank < len(pythons):
        cuda_keys = sorted((k for k in tensors if k.startswith(f"rng.{rank}.cuda.")), key=lambda k: int(k.rsplit(".", 1)[1]))
        cuda = [tensors[k] for k in cuda_keys]
        set_rng_state({"torch": tensors[f"rng.{rank}.torch"], "python": pythons[rank], "cuda": cuda})
    meta["method_state"] = {key[len("method."):]: t for key, t in tensors.items() if key.startswith("method.")}
    return meta


def _jsonable(value):
    if torch.is_tensor(value):
        return value.tolist()
    if isinstance(value, (set, tuple)):
        return list(value)
    raise TypeError(f"{type(value).__name__} is not JSON serialisable")


@contextmanager
def stop_on_signals():
    """An Event set by the first Ctrl-C or SIGTERM (the loop then stops after the
    current step, with a checkpoint); a second signal stops at once."""
    event = threading.Event()
    if threading.current_thread() is not threading.main_thread():
        yield event
        return

    def handler(signum, frame):
        if event.is_set():
            raise KeyboardInterrupt
        event.set()

    previous = {s: signal.signal(s, handler) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield event
    finally:
        for s, h in previous.items():
            signal.signal(s, h)
