"""lorakit.layers.fused: adapters of layers that read one input, computed together.

The fused path must be invisible except in speed: the same outputs and gradients as every
layer on its own (≤1e-6 in fp32) for q/k/v and gate/up, one and three adapters, per-row
batches and merged adapters; the same state-dict keys; and a clean fallback (every member
on its own) where it does not apply.
"""

import copy

import pytest
import torch
from torch import nn

from lorakit import LoraConfig
from lorakit.layers import LoraLinear
from lorakit.layers.fused import settle, shared_input_groups, ungroup
from lorakit.layers.fused_ops import _SharedInputFunction, runnable
from lorakit.model import add_adapter, attach, merge, set_active
from lorakit.per_row import per_row_adapters
from tiny_models import tiny_bert_classifier, tiny_llama, token_batch

TOL = 1e-6


def lora_llama(adapters=("a",), targets="all-linear", **config):
    model = tiny_llama()
    for name in adapters:
        add_adapter(model, LoraConfig(r=4, alpha=8, target_modules=targets, init="random", **config), name)
    set_active(model, *adapters)
    return model


def fused_and_unfused(model):
    """``model`` (grouped) and a copy of it whose layers all run on their own."""
    unfused = copy.deepcopy(model)
    ungroup(unfused)
    return model, unfused


def run(model, ids, passes=2, train=True):
    """The logits and the adapters' gradients of the last of ``passes`` forwards (the first
    pass confirms the groups; later ones compute them together)."""
    model.train(train)
    for p in model.parameters():
        p.grad = None
    for _ in range(passes):
        out = model(input_ids=ids, labels=ids)
    out.loss.backward()
    return out.logits.detach(), {n: p.grad for n, p in model.named_parameters() if p.requires_grad}


def fused_calls(model) -> int:
    return sum(g.fused_calls for g in shared_input_groups(model))


def assert_same(a, b, tol=TOL):
    (logits_a, grads_a), (logits_b, grads_b) = a, b
    assert (logits_a - logits_b).abs().max() <= tol
    assert grads_a.keys() == grads_b.keys() and grads_a
    for name in grads_a:
        if grads_a[name] is None or grads_b[name] is None:  # a merged adapter gets no gradient
            assert grads_a[name] is grads_b[name] is None, name
            continue
        assert (grads_a[name] - grads_b[name]).abs().max() <= tol, name


def test_groups_are_qkv_and_gate_up_confirmed_at_run_time():
    model = lora_llama()
    groups = shared_input_groups(model)
    # candidates by structure: q, k, v, o of each attention (same in_features), gate and up of each MLP
    assert [len(g.members) for g in groups] == [4, 2, 4, 2]
    model(input_ids=token_batch())  # the first pass probes
    model(input_ids=token_batch())
    attention = model.model.layers[0].self_attn
    mlp = model.model.layers[0].mlp
    assert groups[0].leader is attention.q_proj and groups[0].followers == (attention.k_proj, attention.v_proj)
    assert groups[1].leader is mlp.gate_proj and groups[1].followers == (mlp.up_proj,)  # down reads another input
    assert all(g.state == "fused" and g.fused_calls == 1 for g in groups)


@pytest.mark.parametrize("adapters", [("a",), ("a", "b", "c")])
def test_fused_equals_unfused_outputs_and_gradients(adapters):
    fused, unfused = fused_and_unfused(lora_llama(adapters))
    ids = token_batch()
    assert_same(run(fused, ids), run(unfused, ids))
    assert fused_calls(fused) == 4 and fused_calls(unfused) == 0


@pytest.mark.parametrize("targets", [["q_proj", "k_proj", "v_proj"], ["gate_proj", "up_proj"]])
def test_fused_equals_unfused_for_qkv_alone_and_gate_up_alone(targets):
    fused, unfused = fused_and_unfused(lora_llama(("a", "b", "c"), targets=targets))
    ids = token_batch()
    assert_same(run(fused, ids), run(unfused, ids))
    assert fused_calls(fused) == 2


def test_bert_query_key_value_and_inference_without_grad():
    model = tiny_bert_classifier()
    attach(model, LoraConfig(r=4, alpha=8, target_modules=["query", "key", "value"], init="random",
                             modules_to_save=["classifier"]))
    fused, unfused = fused_and_unfused(model)
    ids = token_batch()
    with torch.no_grad():
        for m in (fused, unfused):
            m.eval()
            outs = [m(input_ids=ids).logits for _ in range(2)]
        assert (outs[1] - unfused(input_ids=ids).logits).abs().max() == 0
        assert (fused(input_ids=ids).logits - unfused(input_ids=ids).logits).abs().max() <= TOL
    assert fused_calls(fused) == 4  # 2 layers x 2 passes after probing


def test_per_row_batches_with_three_adapters():
    fused, unfused = fused_and_unfused(lora_llama(("a", "b", "c")))
    ids = token_batch(batch=4)
    rows = ["a", "c", None, "b"]
    with torch.no_grad():
        outs = {}
        for name, model in (("fused", fused), ("unfused", unfused)):
            model.eval()
            with per_row_adapters(model, rows):
                outs[name] = [model(input_ids=ids).logits for _ in range(3)]
    assert fused_calls(fused) == 8  # 4 groups, 2 passes after probing
    for a, b in zip(outs["fused"], outs["unfused"]):
        assert (a - b).abs().max() <= TOL
    # and each row is its adapter's plain forward
    with torch.no_grad():
        set_active(unfused, "c")
        assert (unfused(input_ids=ids[1:2]).logits - outs["fused"][-1][1:2]).abs().max() <= 1e-5


def test_merged_adapters():
    fused, unfused = fused_and_unfused(lora_llama(("a", "b", "c")))
    ids = token_batch()
    for model in (fused, unfused):
        merge(model, ["a"])  # b and c still run unmerged: computed together
    assert_same(run(fused, ids), run(unfused, ids), tol=1e-5)  # a's ΔW inside W: fp32 rounding of W + ΔW
    calls = fused_calls(fused)
    assert calls == 4
    for model in (fused, unfused):
        merge(model, ["b", "c"])  # everything merged: the members run the base alone
    with torch.no_grad():
        assert (fused(input_ids=ids).logits - unfused(input_ids=ids).logits).abs().max() <= 1e-5
    assert fused_calls(fused) == calls


def test_a_member_with_nothing_to_run_still_leads_siblings_that_have():
    model = tiny_llama()
    add_adapter(model, LoraConfig(r=4, alpha=8, target_modules=["q_proj"], init="random"), "q")
    add_adapter(model, LoraConfig(r=4, alpha=8, target_modules=["k_proj", "v_proj"], init="random"), "kv")
    set_active(model, "kv")  # q_proj, which reads the input first, has no active adapter
    fused, unfused = fused_and_unfused(model)
    ids = token_batch()
    assert_same(run(fused, ids), run(unfused, ids))
    assert fused_calls(fused) > 0  # k and v still computed together
    for m in (fused, unfused):
        set_active(m, "q")  # now the other way round
    assert_same(run(fused, ids), run(unfused, ids))


def test_inference_then_training_then_inference_follow_every_optimizer_step():
    """What the group keeps between calls (the plan, A stacked without gradient, Bᵀ views) must
    see in-place updates of A and B."""
    fused, unfused = fused_and_unfused(lora_llama())
    ids = token_batch()
    outs = []
    for model in (fused, unfused):
        with torch.inference_mode():
            for _ in range(2):
                model(input_ids=ids)
        model.train()
        optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
        for _ in range(3):
            model(input_ids=ids, labels=ids).loss.backward()
            optimizer.step()
            optimizer.zero_grad()
        with torch.inference_mode():
            outs.append(model(input_ids=ids).logits)
    assert (outs[0] - outs[1]).abs().max() <= 1e-5
    assert fused_calls(fused) == 4 * 5  # 6 passes, the first probing


@pytest.mark.parametrize("reentrant", [False, True])
def test_activation_checkpointing_recomputes_blocks_as_their_forward_ran(reentrant):
    """A checkpointed block is run again in the backward; non-reentrant checkpointing needs the
    same tensors saved both times, also on the first step (the groups still probing) and after."""
    fused, unfused = fused_and_unfused(lora_llama(("a", "b")))
    for model in (fused, unfused):
        model.gradient_checkpointing_enable({"use_reentrant": reentrant})
        model.enable_input_require_grads()
    ids = token_batch()
    for passes in (1, 1, 2):  # probing, then computed together
        assert_same(run(fused, ids, passes=passes), run(unfused, ids, passes=passes))
    assert fused_calls(fused) > 0


def test_settle_decides_every_group_before_the_passes_that_count():
    model = lora_llama()
    calls = []

    def forward():
        calls.append(1)
        with torch.no_grad():
            model(input_ids=token_batch(batch=1, length=2))

    settle(model, forward)
    assert len(calls) == 2 and all(g.state == "fused" for g in shared_input_groups(model))
    settle(model, forward)  # nothing left to decide: no forward
    assert len(calls) == 2


def test_state_dict_keys_and_copies_are_unchanged():
    model = lora_llama()
    model(input_ids=token_batch())
    plain = copy.deepcopy(model)
    ungroup(plain)
    assert list(model.state_dict()) == list(plain.state_dict())
    copied = copy.deepcopy(model)
    for group in shared_input_groups(copied):
        assert all(any(m is c for c in copied.modules()) for m in group.members)  # the copy's own layers


def test_gradcheck_of_the_group_function():
    """Two members (a Conv1D-layout one without bias), two adapters each, float64."""
    torch.manual_seed(0)
    f64 = dict(dtype=torch.float64, requires_grad=True)
    x = torch.randn(2, 3, 5, **f64)
    A_cat = torch.randn(8, 5, **f64)  # ranks 2, 3 (member 1), 2, 1 (member 2)
    W1, b1, B11, B12 = torch.randn(4, 5, **f64), torch.randn(4, **f64), torch.randn(4, 2, **f64), torch.randn(4, 3, **f64)
    W2, B21, B22 = torch.randn(5, 6, **f64), torch.randn(6, 2, **f64), torch.randn(6, 1, **f64)  # W2 (in, out)
    spec = (((0.5, 2.0), False, 4, 0, (2, 3), ((0, 2), (2, 5))),
            ((1.5, 0.25), True, 6, 4, (6, 7), ((5, 7), (7, 8))))

    def fn(x, A_cat, W1, b1, B11, B12, W2, B21, B22):
        Bts = [B.detach().t() for B in (B11, B12, B21, B22)]
        return _SharedInputFunction.apply((spec, Bts), x, A_cat, W1, b1, B11, B12, W2, None, B21, B22)

    assert torch.autograd.gradcheck(fn, (x, A_cat, W1, b1, B11, B12, W2, B21, B22))


# ---------------------------------------------------------------------- where it does not apply


class TwoReaders(nn.Module):
    """Siblings ``a`` and ``b``; ``b`` reads ``y`` when given, else the same ``x`` as ``a``."""

    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(6, 6), nn.Linear(6, 6)

    def forward(self, x, y=None):
        return self.a(x) + self.b(x if y is None else y)


def test_a_wrong_guess_turns_the_group_off_and_stays_correct():
    torch.manual_seed(0)
    model = attach(TwoReaders(), LoraConfig(r=2, alpha=4, target_modules=["a", "b"], init="random"))
    plain = copy.deepcopy(model)
    ungroup(plain)
    x = torch.randn(3, 6)
    for _ in range(3):
        assert torch.allclose(model(x), plain(x), atol=TOL)
    group, = shared_input_groups(model)
    assert group.state == "fused" and group.fused_calls == 2
    y = torch.randn(3, 6)  # b now reads another tensor: computed on its own, and the group gives up
    assert torch.allclose(model(x, y), plain(x, y), atol=TOL)
    assert group.state == "off" and group.fused_calls == 3  # a's call computed b's output in vain, once
    assert torch.allclose(model(x), plain(x), atol=TOL) and group.fused_calls == 3


def test_siblings_that_never_share_their_input_are_not_fused():
    torch.manual_seed(0)
    model = attach(TwoReaders(), LoraConfig(r=2, alpha=4, target_modules=["a", "b"], init="random"))
    x, y = torch.randn(3, 6), torch.randn(3, 6)
    for _ in range(3):
        model(x, y)
    group, = shared_input_groups(model)
    assert group.state == "off" and group.fused_calls == 0


def test_lora_dropout_falls_back():
    model = lora_llama(dropout=0.1)
    ids = token_batch()
    fused, unfused = fused_and_unfused(model)
    torch.manual_seed(1)
    a = run(fused, ids)
    torch.manual_seed(1)
    assert_same(a, run(unfused, ids), tol=0)
    assert fused_calls(fused) == 0


def test_dora_layers_are_never_grouped():
    model = lora_llama(use_dora=True)
    layer = model.model.layers[0].self_attn.q_proj
    assert type(layer).__name__ == "DoraLinear" and shared_input_groups(model) == []
    mixed = lora_llama(targets=["k_proj", "v_proj"])  # LoRA on k and v, DoRA on q beside them
    add_adapter(mixed, LoraConfig(r=4, alpha=8, target_modules=["q_proj"], init="random", use_dora=True), "d")
    set_active(mixed, "a", "d")
    fused, unfused = fused_and_unfused(mixed)
    assert [len(g.members) for g in shared_input_groups(fused)] == [2, 2]  # k and v of each block
    ids = token_batch()
    assert_same(run(fused, ids), run(unfused, ids))
    assert fused_calls(fused) == 2


def test_a_layer_kind_or_adapter_that_opts_out_falls_back():
    """A layer kind or adapter class sets ``fuse_shared_input = False`` (as DoRA's do)."""
    model = lora_llama()
    model.model.layers[0].self_attn.k_proj.fuse_shared_input = False  # the layer
    model.model.layers[0].mlp.up_proj.adapters["a"].fuse_shared_input = False  # an adapter
    ids = token_batch()
    fused, unfused = fused_and_unfused(model)
    assert_same(run(fused, ids), run(unfused, ids), tol=TOL)
    assert fused_calls(fused) == 2  # layer 1's groups only


def test_adalora_falls_back():
    from lorakit.adalora import attach_adalora

    def build():  # built twice rather than copied: AdaLoRA's gradient hooks belong to their adapter
        torch.manual_seed(0)
        model = attach_adalora(tiny_llama(), targets=["q_proj", "k_proj", "v_proj"], init_rank=4, target_rank=2)
        for layer in (m for m in model.modules() if isinstance(m, LoraLinear)):
            with torch.no_grad():
                layer.adapters["default"].lam.fill_(0.5)
        return model

    fused, unfused = build(), build()
    ungroup(unfused)
    assert shared_input_groups(fused)  # grouped by structure, never computed together
    ids = token_batch()
    assert_same(run(fused, ids), run(unfused, ids), tol=0)
    assert fused_calls(fused) == 0


@pytest.mark.parametrize("frozen", [torch.float32, torch.bfloat16])
def test_under_bf16_autocast_fused_is_as_close_to_fp32_as_unfused(frozen):
    """As `lorakit train --bf16` runs: fp32 factors, frozen weights fp32 or bf16, products in bf16.
    Both paths round to bf16 differently; each is measured against the same model in fp32."""
    model = lora_llama(("a", "b"))
    with torch.no_grad():
        for p in model.parameters():
            if not p.requires_grad:
                p.data = p.data.to(frozen)
    fused, unfused = fused_and_unfused(model)
    reference = copy.deepcopy(unfused).float()
    ids = token_batch()
    ref_logits, ref_grads = run(reference, ids)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        (logits_f, grads_f), (logits_u, grads_u) = run(fused, ids), run(unfused, ids)
    assert fused_calls(fused) == 4
    assert logits_f.dtype == logits_u.dtype == torch.bfloat16

    def error(a, b):  # relative, in the Frobenius norm: bf16 rounds each element by up to 0.4%
        return float((a.float() - b).norm() / b.norm())

    assert error(logits_f, ref_logits) <= 2 * error(logits_u, ref_logits) + 0.01
    for name in grads_f:
        assert grads_f[name].dtype == torch.float32  # fp32 factors, fp32 gradients
        assert error(grads_f[name], ref_grads[name]) <= 2 * error(grads_u[name], ref_grads[name]) + 0.01, name


def test_mixed_dtypes_without_autocast_fall_back():
    bf16 = lora_llama().to(torch.bfloat16)  # bf16 weights with fp32 adapters
    with torch.no_grad():
        for layer in (m for m in bf16.modules() if isinstance(m, LoraLinear)):
            for ad in layer.adapters.values():
                ad.float()
    fused, unfused = fused_and_unfused(bf16)
    ids = token_batch()
    with torch.no_grad():
        outs = [m(input_ids=ids).logits for m in (fused, fused, unfused)]
    assert torch.equal(outs[1], outs[2]) and fused_calls(fused) == 0


@pytest.mark.parametrize("kind", ["int8", "nf4"])
def test_a_quantized_base_falls_back(kind):
    pytest.importorskip("torchao")
    from lorakit.quantize import quantize_base

    model = lora_llama(targets=["q_proj", "k_proj", "v_proj"])
    quantize_base(model.model.layers[0], kind)  # QLoRA: block 0's base weights quantized, block 1's dense
    assert model.model.layers[0].self_attn.q_proj.base_is_quantized
    fused, unfused = fused_and_unfused(model)
    ids = token_batch()
    assert_same(run(fused, ids), run(unfused, ids))
    assert fused_calls(fused) == 1  # block 1's q/k/v alone


def test_a_model_sharded_with_fsdp_computes_each_layer_on_its_own(tmp_path):
    import torch.distributed as dist

    from lorakit import distributed

    dist.init_process_group("gloo", init_method=f"file://{tmp_path}/rendezvous", rank=0, world_size=1)
    try:
        model = lora_llama()
        plain = copy.deepcopy(model)
        assert shared_input_groups(model)
        distributed.shard(model, distributed.Runtime(0, 1, torch.device("cpu"), sharded=True))
        assert shared_input_groups(model) == []
        ids = token_batch()
        logits, _ = run(model, ids)
        plain_logits, _ = run(plain, ids)
        assert (logits - plain_logits).abs().max() <= TOL
    finally:
        dist.destroy_process_group()


def test_sharded_factors_fall_back(tmp_path):
    """FSDP2 shards parameters as DTensors: a factor that is one is never concatenated."""
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Replicate, distribute_tensor

    dist.init_process_group("gloo", init_method=f"file://{tmp_path}/store", rank=0, world_size=1)
    try:
        mesh = init_device_mesh("cpu", (1,))
        layer = lora_llama(targets=["q_proj"]).model.layers[0].self_attn.q_proj
        x = torch.randn(2, 5, 32)
        assert runnable(layer, layer._run, x)
        ad = layer.adapters["a"]
        ad.A = nn.Parameter(distribute_tensor(ad.A.detach(), mesh, [Replicate()]))
        assert not runnable(layer, layer._run, x)
        layer.weight = nn.Parameter(distribute_tensor(layer.weight.detach(), mesh, [Replicate()]), requires_grad=False)
        assert not runnable(layer, [], x)
    finally:
        dist.destroy_process_group()


# ---------------------------------------------------------------------- on a GPU


@pytest.mark.cuda
@pytest.mark.parametrize("adapters", [("a",), ("a", "b", "c")])
def test_on_cuda_fused_equals_unfused(adapters):
    fused, unfused = fused_and_unfused(lora_llama(adapters).cuda())
    ids = token_batch().cuda()
    assert_same(run(fused, ids), run(unfused, ids), tol=1e-5)
    assert fused_calls(fused) == 4


@pytest.mark.cuda
def test_on_cuda_per_row_batches():
    fused, unfused = fused_and_unfused(lora_llama(("a", "b", "c")).cuda())
    ids = token_batch(batch=4).cuda()
    with torch.no_grad():
        outs = []
        for model in (fused, unfused):
            model.eval()
            with per_row_adapters(model, ["a", "c", None, "b"]):
                outs.append([model(input_ids=ids).logits for _ in range(2)][-1])
    assert (outs[0] - outs[1]).abs().max() <= 1e-5 and fused_calls(fused) == 4
