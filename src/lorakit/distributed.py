"""Running one training job in several processes: DDP, or FSDP for models one process cannot hold.

``torchrun --nproc_per_node=N -m lorakit train ...`` starts N processes with ``RANK``,
``WORLD_SIZE``, ``LOCAL_RANK`` and the rendezvous address in their environment;
:func:`setup` joins them into one process group (``nccl`` on GPUs, ``gloo`` on CPU).
A plain ``lorakit train`` is the one-process case of the same code: ``world_size == 1``
and every collective below does nothing.

- DDP (the default, :func:`wrap`): every process holds the whole model; gradients are
  averaged at the end of each backward.
- FSDP (``--fsdp``, :func:`shard`): PyTorch's FSDP2 keeps ``1/world_size`` of every
  parameter (frozen and trainable), gradient and AdamW moment in each process, and
  gathers one transformer block's weights at a time while it computes. The training
  state is gathered whole for saving (:func:`trainable_state`, :func:`optimizer_state`,
  :func:`whole_trainable_parameters`) and split again on loading, so checkpoints and
  adapter files are the same as DDP's and one process's.

Only rank 0 writes files and prints; every rank computes.
"""

from __future__ import annotations

import gc
import os
from contextlib import contextmanager
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn

from lorakit.errors import LorakitError


@dataclass(frozen=True)
class Runtime:
    """Where this process runs.

    Attributes:
        rank: this process's index in ``[0, world_size)``; rank 0 writes files.
        world_size: how many processes train together.
        device: the torch device this process computes on.
        sharded: the model is sharded over the processes with FSDP (never when alone).
    """

    rank: int = 0
    world_size: int = 1
    device: torch.device = torch.device("cpu")
    sharded: bool = False

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


def run_in_bf16(given: bool | None, device: torch.device) -> bool:
    """Whether a run computes in bf16: ``--bf16`` / ``--no-bf16`` where given (``given``),
    else whether ``device`` does it natively (:func:`native_bf16`)."""
    return given if given is not None else native_bf16(device)


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


def setup(requested_device: str = "auto", fsdp: bool = False) -> Runtime:
    """Join the process group torchrun set up, or run alone when there is none.

    Args:
        fsdp: shard the model over the processes (:func:`shard`) rather than copy it
            whole into each (:func:`wrap`); alone, there is nothing to shard.
    """
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    device = pick_device(requested_device, local_rank)
    if world_size <= 1:
        return Runtime(0, 1, device)
    if not dist.is_initialized():
        # on GPUs, gloo still serves the few collectives on CPU tensors (evaluation sums, objects)
        backend = "cpu:gloo,cuda:nccl" if device.type == "cuda" else "gloo"
        if device.type == "cuda":
            torch.cuda.set_device(device)
        dist.init_process_group(backend=backend)
    return Runtime(dist.get_rank(), dist.get_world_size(), device, sharded=fsdp)


def teardown(runtime: Runtime) -> None:
    """Leave the process group (no-op when running alone).

    Wrapped models left in reference cycles are collected first, so their hold on the group
    (DDP's gradient buckets and pending work) ends while the interpreter is fully alive."""
    if runtime.world_size > 1 and dist.is_initialized():
        gc.collect()
        dist.destroy_process_group()


def wrap(model: torch.nn.Module, runtime: Runtime) -> torch.nn.Module:
    """``model`` under DistributedDataParallel when several processes train, else itself
    (alone, or sharded by :func:`shard`, which averages gradients itself).

    DDP averages gradients over processes at the end of ``backward``; rank 0's
    parameters are broadcast at construction, so every rank starts the same.
    """
    if runtime.world_size <= 1 or runtime.sharded:
        return model
    from torch.nn.parallel import DistributedDataParallel

    device_ids = [runtime.device.index] if runtime.device.type == "cuda" else None
    return DistributedDataParallel(model, device_ids=device_ids)


@contextmanager
def gradient_sync(model: torch.nn.Module, runtime: Runtime, sync: bool):
    """A backward inside averages gradients over the processes only if ``sync``; without,
    each process adds them up locally (micro-batches before the last of a step)."""
    if sync or runtime.world_size <= 1:
        yield
    elif runtime.sharded:
        model.set_requires_gradient_sync(False)
        try:
            yield
        finally:
            model.set_requires_gradient_sync(True)
    else:
        with model.no_sync():
            yield


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


# ---------------------------------------------------------------- FSDP: sharding and whole state


def shard(model: nn.Module, runtime: Runtime) -> list[str]:
    """Shard ``model`` over the processes with FSDP2 (``fully_shard``) when ``runtime.sharded``;
    in place. Returns the paths of the units sharded on their own (none when not sharded).

    One unit per transformer block (:func:`lorakit.targets.transformer_blocks`), then the
    root for the rest (embeddings, final norm, heads; tied weights stay together there).
    Each process keeps ``1/world_size`` of every parameter; a unit's whole weights exist
    only while it computes (gathered again in the backward), so a process holds about
    ``1/world_size`` of the model plus one block. Every process must start from the same
    weights (the same checkpoint and seed), as each keeps its own slice of them. Call it
    before the optimizer is built (the parameters become new ``DTensor`` parameters); each
    unit is moved to ``runtime.device`` as it is sharded, so a model loaded on the CPU
    reaches a GPU one block at a time.
    """
    if not runtime.sharded:
        return []
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    from lorakit.layers.fused import ungroup
    from lorakit.targets import transformer_blocks

    ungroup(model)  # FSDP swaps each unit's parameters in and out around its forward: each layer on its own
    mesh = init_device_mesh(runtime.device.type, (runtime.world_size,))
    blocks = transformer_blocks(model)
    for block in blocks.values():
        fully_shard(block, mesh=mesh)
    fully_shard(model, mesh=mesh)
    return list(blocks)


def is_sharded(model: nn.Module) -> bool:
    """Whether ``model`` was sharded by :func:`shard`."""
    from torch.distributed.fsdp import FSDPModule

    return isinstance(model, FSDPModule)


def _whole_options():
    from torch.distributed.checkpoint.state_dict import StateDictOptions

    # gathered to rank 0 only, on the CPU: no process ever holds a second whole copy on its device
    return StateDictOptions(full_state_dict=True, cpu_offload=True, ignore_frozen_params=True)


def trainable_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """``{parameter name: tensor}`` of ``model``'s trainable parameters, whole.

    Not sharded: the live parameters (detached). Sharded: gathered with
    ``get_model_state_dict``, a collective every process must call; rank 0 receives copies
    on the CPU, the other processes an empty dict.
    """
    trainable = {name: p.detach() for name, p in model.named_parameters() if p.requires_grad}
    if not is_sharded(model):
        return trainable
    from torch.distributed.checkpoint.state_dict import get_model_state_dict

    whole = get_model_state_dict(model, options=_whole_options())  # buffers too: keep the parameters
    return {name: whole[name] for name in trainable if name in whole}


def load_trainable_state(model: nn.Module, tensors: dict[str, torch.Tensor]) -> None:
    """Copy whole ``tensors`` (by parameter name; a subset is fine) into ``model``'s
    parameters; a sharded model keeps each process's slice (every process calls it with
    the same tensors)."""
    if not is_sharded(model):
        params = dict(model.named_parameters())
        with torch.no_grad():
            for name, tensor in tensors.items():
                params[name].copy_(tensor)
        return
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

    set_model_state_dict(model, tensors, options=StateDictOptions(full_state_dict=True, strict=False))


def optimizer_state(model: nn.Module, optimizer: torch.optim.Optimizer) -> dict:
    """``optimizer.state_dict()`` (torch's format: parameters by their index in the
    parameter groups) with whole tensors. Sharded: a collective every process must call
    (``get_optimizer_state_dict``); rank 0 receives it on the CPU, the others ``{}``."""
    if not is_sharded(model):
        return optimizer.state_dict()
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

    whole = get_optimizer_state_dict(model, optimizer, options=_whole_options())
    if not whole:
        return {}
    # torch's own state dict numbers the parameters through the groups in order; the gathered one names them
    index = {name: i for i, name in enumerate(n for group in whole["param_groups"] for n in group["params"])}
    return {"state": {index[name]: state for name, state in whole["state"].items()},
            "param_groups": [{**group, "params": [index[n] for n in group["params"]]} for group in whole["param_groups"]]}


def load_optimizer_state(model: nn.Module, optimizer: torch.optim.Optimizer, state: dict) -> None:
    """Load what :func:`optimizer_state` returned (every process the same whole state);
    a sharded model's optimizer keeps each process's slice."""
    if not is_sharded(model):
        optimizer.load_state_dict(state)
        return
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

    names = {id(p): name for name, p in model.named_parameters()}
    name_of = [names[id(p)] for group in optimizer.param_groups for p in group["params"]]
    named = {"state": {name_of[int(i)]: s for i, s in state["state"].items()},
             "param_groups": [{**group, "params": [name_of[int(i)] for i in group["params"]]}
                              for group in state["param_groups"]]}
    set_optimizer_state_dict(model, optimizer, named, options=StateDictOptions(full_state_dict=True))


@contextmanager
def whole_trainable_parameters(model: nn.Module):
    """Inside, rank 0's ``model`` holds its trainable parameters whole, so code written for
    an ordinary model (saving an adapter or a model folder) reads them as they are.

    Not sharded: nothing changes. Sharded: a collective every process enters; the
    parameters are gathered (:func:`trainable_state`) onto rank 0's device and put in place
    of its slices (in every module that shares them), which are put back on the way out.
    No forward or optimizer step may run inside.
    """
    if not is_sharded(model):
        yield
        return
    whole = trainable_state(model)
    replacement = {id(p): nn.Parameter(whole[name].to(p.device), requires_grad=True)
                   for name, p in model.named_parameters() if name in whole}
    # every registration of each parameter (a tied weight sits in two modules), as FSDP itself finds them
    swapped = [(module, leaf, p) for module in model.modules() for leaf, p in module._parameters.items()
               if p is not None and id(p) in replacement]
    for module, leaf, p in swapped:
        module.register_parameter(leaf, replacement[id(p)])
    try:
        yield
    finally:
        for module, leaf, p in swapped:
            module.register_parameter(leaf, p)
