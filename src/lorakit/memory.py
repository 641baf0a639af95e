"""Will it fit? The peak memory of a training step, predicted before anything is allocated.

:func:`predict_peak` builds the model from its config on *fake* tensors (PyTorch's
``FakeTensorMode``: shapes and dtypes, no storage), prepares it as :func:`lorakit.train.train`
does (the method's adapters, frozen weights in bf16 under ``--bf16``, ``--quantize``,
``--gradient-checkpointing``), and runs two AdamW steps on a batch of ``batch_size ×
max_length`` tokens through the task's own loss, while :class:`LiveBytes` adds up the
bytes of every tensor alive at each operation. The highest sum is the step's peak: weights,
gradients, optimizer state and activations exactly as this code makes them, whatever the
architecture, since nothing is modelled by hand. Nothing is allocated, so a model far too
large for the machine is predicted in seconds.

What it cannot see is added: the Python process with torch and transformers loaded
(:func:`runtime_bytes`, this process's own resident size) and the CPU allocator's slack.
glibc keeps freed blocks below its adaptive mmap threshold (up to 32 MiB) in its heap, so a
process's resident peak exceeds its tensors' peak: measured on MiniLM and SmolLM2 steps
(``benchmarks/memory.py``), by about a fifth of the step's activations and temporaries plus
a few tens of MiB (:data:`HEAP_SLACK`, :data:`FIXED_SLACK`). Padding is not modelled: every
sequence is taken at ``max_length`` (the worst case; ``lorakit train`` pads each batch only to
its longest example). Where a model looks at values (transformers skips an all-ones attention
mask), fake tensors take the general path (the mask is built): a slight overestimate.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from torch.multiprocessing.reductions import StorageWeakRef
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

GiB = 2**30
HEAP_SLACK = 0.2  # resident bytes glibc keeps per byte of activations and temporaries (measured, CPU)
FIXED_SLACK = 64 * 2**20  # and a constant part: kernels' scratch, autograd's graph (measured, CPU)


@dataclass
class MemoryEstimate:
    """The predicted peak of one training step, in bytes.

    Attributes:
        weights: parameters and buffers as trained (quantized ones at their stored size).
        gradients: the trainable parameters' gradients.
        optimizer: AdamW's two moments (and step counters).
        activations: what the step holds on top of those at its peak: activations kept
            for the backward and the temporaries of the operation running then.
        allocator: what the CPU allocator keeps beyond the live tensors (see the module docstring).
        runtime: the process without any model (torch, transformers, lorakit loaded).
        tensors: the most bytes of tensors alive at once during the steps (the weights included).
        trainable: trainable parameters.
        tokens: ``batch_size × max_length``.

    ``peak`` is ``max(tensors, weights + gradients + optimizer + activations)`` plus the
    allocator's slack and the runtime; the parts need not all be at their largest at once
    (gradients grow in the backward while activations are freed).
    """

    weights: int
    gradients: int
    optimizer: int
    activations: int
    allocator: int
    runtime: int
    tensors: int
    trainable: int
    tokens: int

    @property
    def peak(self) -> int:
        return self.tensors + self.allocator + self.runtime

    def fits(self, budget: int) -> bool:
        return self.peak <= budget

    def rows(self) -> list[tuple[str, int]]:
        return [("weights", self.weights), ("gradients", self.gradients), ("optimizer state", self.optimizer),
                ("activations", self.activations), ("allocator slack", self.allocator), ("runtime", self.runtime),
                ("peak", self.peak)]


def predict_peak(config) -> MemoryEstimate:
    """The peak memory of a training step of ``config`` (a :class:`lorakit.train.TrainConfig`)
    on the CPU, predicted on fake tensors (see the module docstring).

    The prediction runs in a fresh Python process (about three seconds more): freeing the
    fake tensors of a model with ``modules_to_save`` (a classifier) now and then crashes
    PyTorch 2.13's garbage collector later in the process that made them, so that process
    is one that ends right after. Its own resident size is the ``runtime`` part.

    Raises:
        LorakitError: the model's config cannot be read, a setting is invalid, or the
            prediction failed (the message holds its last words).
    """
    import json
    import os
    import subprocess
    import sys
    from dataclasses import asdict
    from pathlib import Path

    from lorakit.errors import LorakitError

    source = str(Path(__file__).resolve().parent.parent)  # the folder holding the lorakit package
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [source, os.environ.get("PYTHONPATH")])))
    done = subprocess.run([sys.executable, "-m", "lorakit.memory", json.dumps(asdict(config))], capture_output=True,
                          text=True, env=env)
    lines = done.stdout.strip().splitlines()
    answer = json.loads(lines[-1]) if lines and lines[-1].startswith("{") else None
    if answer is None or "error" in answer:
        why = answer["error"] if answer else (done.stderr.strip().splitlines() or ["no output"])[-1]
        raise LorakitError(f"the memory prediction for {config.model} failed: {why}")
    return MemoryEstimate(**answer)


def _predict_here(config) -> MemoryEstimate:
    """:func:`predict_peak` in this process (the child :func:`predict_peak` starts)."""
    import warnings

    from lorakit.errors import LorakitError

    if config.batch_size is None or config.max_length is None:
        raise LorakitError("a memory prediction needs a batch size and a length (lorakit.recipe.with_shape fills them)")

    from torch._subclasses.fake_tensor import FakeTensorMode

    with warnings.catch_warnings(), FakeTensorMode(allow_non_fake_inputs=True):
        warnings.simplefilter("ignore")  # fake tensors make torch and transformers say things a user need not see
        step, model = training_step(config)
        params = [p for p in model.parameters() if p.requires_grad]
        with LiveBytes() as live:
            for tensor in [*model.parameters(), *model.buffers()]:
                live.add(tensor)
            weights = live.now
            step()
            optimizer_bytes = live.now - weights  # what the first step leaves: AdamW's state
            step()  # the second step runs with that state allocated
    gradients = sum(p.numel() * p.element_size() for p in params)
    activations = max(0, live.peak - weights - optimizer_bytes - gradients)
    return MemoryEstimate(weights=weights, gradients=gradients, optimizer=optimizer_bytes, activations=activations,
                          allocator=int(HEAP_SLACK * activations) + FIXED_SLACK, runtime=runtime_bytes(),
                          tensors=live.peak, trainable=sum(p.numel() for p in params),
                          tokens=config.batch_size * config.max_length)


def training_step(config):
    """``(step, model)``: the model of ``config`` built from its config (random weights, which
    memory does not depend on) and prepared as :func:`lorakit.train.train` prepares it, and a
    function running one AdamW step on a ``batch_size × max_length`` batch through the task's
    loss. On fake tensors under :func:`predict_peak`; on real ones it is what the prediction
    is checked against (``benchmarks/memory.py``)."""
    from lorakit.distributed import run_in_bf16

    bf16 = run_in_bf16(config.bf16, torch.device("cpu"))
    model, task = _prepared_model(config, bf16)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-4, foreach=False)
    batch = task.fake_batch(config.batch_size, config.max_length)

    def step() -> None:
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            loss = task.fake_loss(model, batch)
        loss.backward()
        del loss
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return step, model


def _prepared_model(config, bf16: bool):
    """The model of ``config`` on fake tensors, made trainable and stored as ``train`` does."""
    import transformers

    from lorakit.checkpointing import enable_checkpointing
    from lorakit.methods import frozen_to_bf16, get_method
    from lorakit.models import load_model_config
    from lorakit.quantize import quantize_base
    from lorakit.tasks import get_task

    task, method = get_task(config.task), get_method(config.method)
    model_config = load_model_config(task.default_model if config.model == "default" else config.model)
    for key, value in task.config_settings.items():  # a regressor's one output
        setattr(model_config, key, value)
    model = getattr(transformers, task.auto_class).from_config(model_config, dtype=torch.float32)
    model = method.prepare(model, config, task.heads(model))
    if bf16 and method.frozen_in_bf16:  # as lorakit.train stores frozen weights under bf16
        frozen_to_bf16(model)
    model.train()
    if config.quantize:
        quantize_base(model, config.quantize)
    if config.gradient_checkpointing:
        enable_checkpointing(model)
    return model, task


def runtime_bytes() -> int:
    """Resident size of this process now: Python with torch, transformers and lorakit loaded,
    which a training process carries too before its model is loaded."""
    import psutil

    return int(psutil.Process().memory_info().rss)


def available_bytes() -> int:
    """Memory this machine has in all (the budget ``lorakit inspect --memory`` checks against)."""
    import psutil

    return int(psutil.virtual_memory().total)


class LiveBytes(TorchDispatchMode):
    """Adds up the bytes of the tensor storages alive at each operation and keeps the highest sum.

    Every output of an operation is counted once per storage when made and taken off once
    its storage is freed; a quantized tensor counts the tensors it holds. Tensors made
    before the mode starts count only when :meth:`add` is given them. Storages are watched
    through PyTorch's own C++-level weak references (``StorageWeakRef``, what its fake-tensor
    mode uses), never by keeping their Python objects: holding those for fake tensors trips
    an internal assertion of PyTorch's garbage collection.

    Attributes:
        now: bytes alive now. peak: the most alive at once.
    """

    def __init__(self):
        super().__init__()
        self.now = 0
        self.peak = 0
        self._alive: dict[int, tuple[StorageWeakRef, int]] = {}  # storage address -> (weak reference, bytes)

    def add(self, tensor: torch.Tensor) -> None:
        for storage in _storages(tensor):
            ref = StorageWeakRef(storage)
            if ref.cdata in self._alive:
                continue
            size = storage.nbytes()
            self._alive[ref.cdata] = (ref, size)
            self.now += size
        self.peak = max(self.peak, self.now)

    def _drop_freed(self) -> None:
        freed = [key for key, (ref, _) in self._alive.items() if ref.expired()]
        for key in freed:
            self.now -= self._alive.pop(key)[1]

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self._drop_freed()
        out = func(*args, **(kwargs or {}))
        for tensor in tree_flatten(out)[0]:
            if isinstance(tensor, torch.Tensor):
                self.add(tensor)
        return out


def _storages(tensor: torch.Tensor) -> list:
    if type(tensor) not in (torch.Tensor, nn.Parameter) and hasattr(tensor, "__tensor_flatten__"):
        names, _ = tensor.__tensor_flatten__()
        return [s for n in names if isinstance(getattr(tensor, n), torch.Tensor) for s in _storages(getattr(tensor, n))]
    return [tensor.untyped_storage()]


def _child(settings: str) -> None:
    """Print :func:`_predict_here`'s estimate of ``TrainConfig(**json.loads(settings))`` as a JSON
    line and leave at once (no teardown: see :func:`predict_peak`)."""
    import gc
    import json
    import os
    from dataclasses import asdict

    from lorakit.errors import LorakitError
    from lorakit.train_config import TrainConfig

    gc.disable()  # the fake tensors are never collected: the process ends right after
    try:
        answer = asdict(_predict_here(TrainConfig(**json.loads(settings))))
    except LorakitError as err:
        answer = {"error": str(err)}
    print(json.dumps(answer), flush=True)
    os._exit(0)


if __name__ == "__main__":
    import sys

    _child(sys.argv[1])
