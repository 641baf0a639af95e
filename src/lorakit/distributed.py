"""Running one training job in several processes with torch DistributedDataParallel.

``torchrun --nproc_per_node=N -m lorakit train ...`` starts N processes with ``RANK``,
``WORLD_SIZE``, ``LOCAL_RANK`` and the rendezvous address in their environment;
:func:`setup` joins them into one process group (``nccl`` on GPUs, ``gloo`` on CPU).
A plain ``lorakit train`` is the one-process case of the same code: ``world_size == 1``
and every collective below does nothing.

Only rank 0 writes files and prints; every rank computes.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

from lorakit.errors import LorakitError


@dataclass(frozen=True)
class Runtime:
    """Where this process runs.

    Attributes:
        rank: this process's index in ``[0, world_size)``; rank 0 writes files.
        world_size: how many processes train together.
        device: the torch device this process computes on.
    """

    rank: int = 0
    world_size: int = 1
    device: torch.device = torch.device("cpu")

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def pick_device(requested: str = "auto", local_rank: int = 0) -> torch.device:
    """``"auto"``: this process's GPU when there is one, else the CPU; or the device named."""
    if requested == "auto":
        return torch.device(f"cuda:{local_rank}") if torch.cuda.is_available() else torch.device("cpu")
    try:
        device = torch.device(requested)
    except RuntimeError:
        raise LorakitError(f"device {requested!r} is not a torch device; give 'auto', 'cpu' or 'cuda'") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise LorakitError(f"device {requested!r} asked for, but torch sees no CUDA GPU; use --device cpu")
    if device.type == "cuda" and device.index is None:
        device = torch.device(f"cuda:{local_rank}")
    return device


def native_bf16(device: torch.device) -> bool:
    """Whether ``device`` computes bfloat16 matrix products in hardware: a GPU with bf16
    support, or a CPU with AMX or AVX512-BF16 (where bf16 autocast is about 2x faster than
    fp32; on other CPUs it is emulated and slower)."""
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    if device.type != "cpu":
        return False
    try:
        return bool(torch.cpu._is_amx_tile_supported() or torch.cpu._is_avx512_bf16_supported())
    except AttributeError:  # a torch without these probes: stay in fp32
        return False


def setup(requested_device: str = "auto") -> Runtime:
    """Join the process group torchrun set up, or run alone when there is none."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    device = pick_device(requested_device, local_rank)
    if world_size <= 1:
        return Runtime(0, 1, device)
    if not dist.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        if device.type == "cuda":
            torch.cuda.set_device(device)
        dist.init_process_group(backend=backend)
    return Runtime(dist.get_rank(), dist.get_world_size(), device)


def teardown(runtime: Runtime) -> None:
    """Leave the process group (no-op when running alone)."""
    if runtime.world_size > 1 and dist.is_initialized():
        dist.destroy_process_group()


def wrap(model: torch.nn.Module, runtime: Runtime) -> torch.nn.Module:
    """``model`` under DistributedDataParallel when several processes train, else itself.

    DDP averages gradients over processes at the end of ``backward``; rank 0's
    parameters are broadcast at construction, so every rank starts the same.
    """
    if runtime.world_size <= 1:
        return model
    from torch.nn.parallel import DistributedDataParallel

    device_ids = [runtime.device.index] if runtime.device.type == "cuda" else None
    return DistributedDataParallel(model, device_ids=device_ids)


def sum_over_ranks(value: torch.Tensor, runtime: Runtime) -> torch.Tensor:
    """``value`` summed over all processes (a copy; itself when alone)."""
    value = value.detach().clone()
    if runtime.world_size > 1:
        dist.all_reduce(value)
    return value


def any_rank(flag: bool, runtime: Runtime) -> bool:
    """True on every process when ``flag`` is True on any (so all stop at the same step)."""
    if runtime.world_size <= 1:
        return flag
    value = torch.tensor([1.0 if flag else 0.0], device=runtime.device)
    dist.all_reduce(value)
    return bool(value.item() > 0)


def gather_objects(obj, runtime: Runtime) -> list:
    """``[obj of rank 0, obj of rank 1, ...]`` on every process (picklable objects)."""
    if runtime.world_size <= 1:
        return [obj]
    out = [None] * runtime.world_size
    dist.all_gather_object(out, obj)
    return out


def barrier(runtime: Runtime) -> None:
    if runtime.world_size > 1:
        dist.barrier()
