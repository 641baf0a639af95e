"""Activation checkpointing: a checkpointed step equals the plain one, with frozen embeddings,
keeps fewer activations for the backward, and leaves the model's names alone."""

import copy
import warnings

import torch
from torch import nn

from lorakit import LoraConfig, attach
from lorakit.chunked_loss import causal_lm_loss
from lorakit.checkpointing import block_stack, checkpoint_blocks, enable_checkpointing
from tiny_models import tiny_bert_classifier, tiny_llama, token_batch


def saved_bytes(step) -> tuple[int, dict]:
    """Bytes autograd keeps for the backward while ``step()`` builds the graph, and the grads."""
    kept = {}

    def pack(t):
        kept[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = step()
    loss.backward()
    return sum(kept.values()), loss.detach()


def grads(model):
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def test_checkpointed_lora_step_equals_the_plain_step_with_frozen_embeddings():
    plain = attach(tiny_llama(), LoraConfig(r=4, target_modules="all-linear", init="random")).train()
    checkpointed = copy.deepcopy(plain)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        assert enable_checkpointing(checkpointed) == 2
    assert not checkpointed.get_input_embeddings().weight.requires_grad
    ids = token_batch(4, 16)
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids}

    plain_saved, plain_loss = saved_bytes(lambda: causal_lm_loss(plain, batch)[0])
    ckpt_saved, ckpt_loss = saved_bytes(lambda: causal_lm_loss(checkpointed, batch)[0])
    torch.testing.assert_close(ckpt_loss, plain_loss, atol=1e-6, rtol=1e-6)
    want, got = grads(plain), grads(checkpointed)
    assert want.keys() == got.keys() and len(want) == 2 * 14
    for name in want:
        torch.testing.assert_close(got[name], want[name], atol=1e-6, rtol=1e-6, msg=name)
    assert ckpt_saved < 0.5 * plain_saved  # only the blocks' inputs stay for the backward
    assert set(checkpointed.state_dict()) == set(plain.state_dict())


def test_encoder_classifier_checkpoints_too():
    plain = attach(tiny_bert_classifier(), LoraConfig(r=4, target_modules=["query", "value"],
                                                      modules_to_save=["classifier"], init="random"))
    plain.train()
    for module in plain.modules():  # no dropout, so both runs see the same network
        if isinstance(module, nn.Dropout):
            module.p = 0.0
    checkpointed = copy.deepcopy(plain)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        enable_checkpointing(checkpointed)
    ids = token_batch(3, 10)
    for model in (plain, checkpointed):
        model(input_ids=ids).logits.square().sum().backward()
    for name, grad in grads(plain).items():
        torch.testing.assert_close(grads(checkpointed)[name], grad, atol=1e-6, rtol=1e-6, msg=name)


class Blocks(nn.Module):
    """A plain model: a frozen embedding, a stack of MLP blocks with LoRA, a head."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.embed = nn.Embedding(50, 32)
        self.blocks = nn.ModuleList(nn.Sequential(nn.Linear(32, 64), nn.GELU(), nn.Linear(64, 32)) for _ in range(3))
        self.head = nn.Linear(32, 5)

    def forward(self, ids):
        h = self.embed(ids)
        for block in self.blocks:
            h = h + block(h)
        return self.head(h)


def test_a_plain_module_checkpointed_by_blocks_equals_the_plain_step():
    plain = attach(Blocks(), LoraConfig(r=2, target_modules=["0", "2"], init="random"))
    checkpointed = copy.deepcopy(plain)
    assert block_stack(checkpointed) == list(checkpointed.blocks)
    assert checkpoint_blocks(checkpointed) == 3
    ids = torch.randint(0, 50, (4, 7))
    plain_saved, plain_loss = saved_bytes(lambda: plain(ids).square().mean())
    ckpt_saved, ckpt_loss = saved_bytes(lambda: checkpointed(ids).square().mean())
    torch.testing.assert_close(ckpt_loss, plain_loss, atol=1e-6, rtol=1e-6)
    for name, grad in grads(plain).items():
        torch.testing.assert_close(grads(checkpointed)[name], grad, atol=1e-6, rtol=1e-6, msg=name)
    assert ckpt_saved < plain_saved
    assert set(checkpointed.state_dict()) == set(plain.state_dict())


def test_lorakit_train_with_gradient_checkpointing_ends_with_the_same_adapter(tmp_path):
    from safetensors.torch import load_file

    from lorakit.train import TrainConfig, train
    from tiny_training import chat_records, save_tiny_llama, write_jsonl

    model = str(save_tiny_llama(tmp_path / "llm"))
    data = str(write_jsonl(tmp_path / "chat.jsonl", chat_records(40)))
    adapters = []
    for checkpointed in (False, True):
        out = tmp_path / f"run-{checkpointed}"
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)
            train(TrainConfig(task="chat", model=model, data=data, steps=4, batch_size=8, lr=1e-2,
                              targets="all-linear", bf16=False, out=str(out), progress=False,
                              gradient_checkpointing=checkpointed))
        adapters.append(load_file(str(out / "adapter" / "adapter_model.safetensors")))
    assert adapters[0].keys() == adapters[1].keys()
    for key in adapters[0]:
        torch.testing.assert_close(adapters[1][key], adapters[0][key], atol=1e-6, rtol=1e-5, msg=key)
