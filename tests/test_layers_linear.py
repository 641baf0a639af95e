"""LoraLinear under torch.compile: no graph break, no recompilation when the adapter is switched,
and a compiled LoRA model computes what the eager one does (outputs and gradients).

The graph-break and recompile counts use the ``aot_eager`` backend (dynamo's capture and
AOT autograd, no code generation: seconds); the equality test compiles with the default
backend (inductor: C++ kernels on CPU), which is what ``lorakit train --compile`` uses.
"""

import copy

import pytest
import torch
import torch._dynamo
from torch import nn
from torch._dynamo.utils import counters

from lorakit import LoraConfig
from lorakit.model import add_adapter, attach, set_active
from tiny_models import tiny_llama, token_batch


@pytest.fixture(autouse=True)
def fresh_dynamo():
    torch._dynamo.reset()
    counters.clear()
    yield
    torch._dynamo.reset()


def two_adapter_llama():
    model = tiny_llama()
    for name in ("a", "b"):
        add_adapter(model, LoraConfig(r=4, alpha=8, target_modules="all-linear", init="random"), name)
    set_active(model, "a")
    return model.train()


def test_a_lora_model_compiles_as_one_graph():
    model = two_adapter_llama()
    ids = token_batch()
    explanation = torch._dynamo.explain(lambda ids: model(input_ids=ids, labels=ids).loss)(ids)
    assert explanation.graph_break_count == 0, [b.reason for b in explanation.break_reasons]
    assert explanation.graph_count == 1


def test_switching_adapters_does_not_recompile_and_each_gives_its_own_result():
    model = two_adapter_llama()
    ids = token_batch()
    compiled = torch.compile(lambda ids: model(input_ids=ids, labels=ids).loss, backend="aot_eager")
    losses = {}
    for name in ("a", "b", "a", "b", "a", "b"):
        set_active(model, name)
        loss = compiled(ids)
        loss.backward()
        losses.setdefault(name, []).append(loss.item())
    assert counters["stats"]["unique_graphs"] == 1
    assert sum(counters["recompiles"].values()) == 0
    for name in ("a", "b"):
        set_active(model, name)
        eager = model(input_ids=ids, labels=ids).loss.item()
        assert all(abs(loss - eager) < 1e-6 for loss in losses[name])
    assert abs(losses["a"][0] - losses["b"][0]) > 1e-4  # the switch really changed the model


class Block(nn.Module):
    """Two LoRA targets reading one input and a third after them, as in a transformer MLP."""

    def __init__(self):
        super().__init__()
        self.gate, self.up, self.down = nn.Linear(16, 32), nn.Linear(16, 32), nn.Linear(32, 16)

    def forward(self, x):
        return self.down(torch.nn.functional.silu(self.gate(x)) * self.up(x))


def test_a_compiled_lora_model_matches_eager():
    torch.manual_seed(0)
    eager = attach(Block(), LoraConfig(r=4, alpha=8, target_modules=["gate", "up", "down"], init="random"))
    compiled = copy.deepcopy(eager)
    compiled.compile()  # in place, as `lorakit train --compile`: the state-dict keys stay
    assert list(compiled.state_dict()) == list(eager.state_dict())
    x = torch.randn(3, 5, 16)
    grad = torch.randn(3, 5, 16)
    results = []
    for model in (eager, compiled):
        for _ in range(2):  # the second pass: the eager model's shared-input group is computing now
            model.zero_grad()
            out = model(x)
            out.backward(grad)
        results.append((out.detach(), {n: p.grad for n, p in model.named_parameters() if p.requires_grad}))
    (out_e, grads_e), (out_c, grads_c) = results
    assert torch.allclose(out_e, out_c, atol=1e-5)
    assert grads_e.keys() == grads_c.keys() and len(grads_e) == 6
    for name in grads_e:
        assert torch.allclose(grads_e[name], grads_c[name], atol=1e-5), name


@pytest.mark.cuda
def test_on_cuda_a_compiled_lora_model_matches_eager_and_switches_without_recompiling():
    model = two_adapter_llama().cuda()
    ids = token_batch().cuda()
    compiled = torch.compile(lambda ids: model(input_ids=ids, labels=ids).loss)  # inductor: Triton kernels
    for name in ("a", "b", "a"):
        set_active(model, name)
        loss = compiled(ids)
        loss.backward()
        eager = model(input_ids=ids, labels=ids).loss
        assert abs(loss.item() - eager.item()) < 1e-4
    assert sum(counters["recompiles"].values()) == 0
