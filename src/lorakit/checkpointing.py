"""Activation checkpointing: keep only each block's input for the backward and run the block
again there, trading one more forward of the body for the activations of all blocks.

- :func:`enable_checkpointing` on a transformers model uses its own switch
  (``activation_checkpointing_enable``, formerly ``gradient_checkpointing_enable``): every
  decoder or encoder layer is checkpointed, non-reentrant;
- :func:`checkpoint_blocks` on any other module checkpoints the blocks of its block stack
  (by default the children of its largest ``nn.ModuleList``) with PyTorch's composable
  ``checkpoint``, which adds hooks and leaves module paths and state-dict keys as they were.

Non-reentrant checkpointing has no trouble with frozen embeddings (the classic PEFT failure
"element 0 of tensors does not require grad" comes from the reentrant kind, whose block
output needs an input that requires grad); the transformers path also makes the embedding
output require grad, as PEFT does, so a reentrant function set later still works. Nothing
is written into the state dict or the optimizer, so a checkpointed run resumes from a plain
one's checkpoint and the other way round.
"""

from __future__ import annotations

from torch import nn

from lorakit.errors import LorakitError


def enable_checkpointing(model: nn.Module) -> int:
    """Checkpoint the blocks of ``model`` (non-reentrant), in place.

    Returns:
        the number of blocks checkpointed.

    Raises:
        LorakitError: the model has no blocks to checkpoint.
    """
    if getattr(model, "supports_gradient_checkpointing", False):
        enable = getattr(model, "activation_checkpointing_enable", None) or model.gradient_checkpointing_enable
        enable({"use_reentrant": False})
        embeddings = model.get_input_embeddings()
        if embeddings is not None and not any(p.requires_grad for p in embeddings.parameters()):
            model.enable_input_require_grads()
        return sum(1 for m in model.modules()  # the layers, not the models that also carry the flag
                   if getattr(m, "gradient_checkpointing", False) and not hasattr(m, "supports_gradient_checkpointing"))
    return checkpoint_blocks(model)


def checkpoint_blocks(model: nn.Module, blocks: list[nn.Module] | None = None) -> int:
    """Checkpoint each module of ``blocks`` (default: :func:`block_stack` of ``model``) with
    ``torch.distributed._composable.checkpoint`` (non-reentrant; module paths unchanged).

    Returns:
        the number of blocks checkpointed.

    Raises:
        LorakitError: no blocks were given and the model has no ``nn.ModuleList``.
    """
    from torch.distributed._composable import checkpoint

    blocks = block_stack(model) if blocks is None else list(blocks)
    for block in blocks:
        checkpoint(block)
    return len(blocks)


def block_stack(model: nn.Module) -> list[nn.Module]:
    """The children of the ``nn.ModuleList`` of ``model`` holding the most parameters (the
    transformer's layers, in a model built the usual way).

    Raises:
        LorakitError: the model has no ``nn.ModuleList``.
    """
    stacks = [m for m in model.modules() if isinstance(m, nn.ModuleList) and len(m)]
    if not stacks:
        raise LorakitError(f"{type(model).__name__} keeps no blocks in an nn.ModuleList; give the blocks to "
                           "checkpoint_blocks(model, blocks=[...])")
    largest = max(stacks, key=lambda stack: sum(p.numel() for p in stack.parameters()))
    return list(largest)
