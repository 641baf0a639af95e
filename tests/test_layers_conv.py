"""LoRA on convolutions (lorakit.layers.conv): the forward is the convolution with kernel
``W + s·B·A``, merge/unmerge, per-row batches, gradients, inspect, and PEFT both ways on a
tiny conv net and a tiny ResNet from a transformers config."""

import pytest
import torch
from torch import nn
from transformers import ConvNextConfig, ConvNextForImageClassification, ResNetConfig, ResNetForImageClassification

from lorakit import LoraConfig, LorakitError, attach, load_adapter, save_adapter
from lorakit.layers import LoraConv, wrapper_for
from lorakit.model import add_adapter, lora_layers, merge, set_active, targetable_modules, unmerge
from lorakit.models import target_footprint
from lorakit.per_row import per_row_adapters

peft = pytest.importorskip("peft")

CONVS = {  # base, input
    "conv1d": (lambda: nn.Conv1d(3, 5, 3, stride=2, padding=1), (2, 3, 9)),
    "conv2d": (lambda: nn.Conv2d(3, 5, (3, 2), padding=1, dilation=2), (2, 3, 8, 7)),
    "conv2d-reflect": (lambda: nn.Conv2d(3, 5, 3, padding=1, padding_mode="reflect"), (2, 3, 6, 6)),
    "conv3d": (lambda: nn.Conv3d(2, 4, (1, 2, 2), stride=(1, 2, 1), bias=False), (2, 2, 3, 4, 4)),
}


def perturb(model, seed=0, std=0.1):
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, p in sorted(model.named_parameters(), key=lambda kv: kv[0]):
            if p.requires_grad:
                p.add_(torch.randn(p.shape, generator=generator) * std)


def wrapped(name, kind="lora"):
    torch.manual_seed(0)
    make, shape = CONVS[name]
    base = make()
    layer = wrapper_for(base, kind)(base)
    layer.add_adapter("default", r=2, alpha=4, scaling=2.0, init="random")
    layer.set_active(["default"])
    return base, layer, torch.randn(shape)


@pytest.mark.parametrize("name", CONVS)
def test_forward_is_the_convolution_with_the_adapted_kernel(name):
    base, layer, x = wrapped(name)
    ad = layer.adapters["default"]
    kernel = layer.weight + ad.scaling * (ad.B @ ad.A).view(layer.weight.shape)
    expected = base._conv_forward(x, kernel, base.bias)
    torch.testing.assert_close(layer(x), expected, atol=1e-5, rtol=1e-5)
    assert layer(x).shape == base(x).shape


@pytest.mark.parametrize("name", CONVS)
def test_merge_then_unmerge(name):
    _, layer, x = wrapped(name)
    weight = layer.weight.detach().clone()
    expected = layer(x)
    layer.merge()
    torch.testing.assert_close(layer(x), expected, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(layer.weight, weight + layer.delta_weight("default"))
    layer.unmerge()
    torch.testing.assert_close(layer.weight, weight, atol=1e-7, rtol=0)


def test_gradients_reach_A_and_B_only():
    model = attach(nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.Conv2d(4, 2, 1)),
                   LoraConfig(r=2, target_modules=["0", "2"], init="kaiming"))
    model(torch.randn(2, 3, 6, 6)).square().mean().backward()
    got = {n for n, p in model.named_parameters() if p.grad is not None}
    assert got == {f"{i}.adapters.default.{f}" for i in (0, 2) for f in "AB"}


@pytest.mark.parametrize("kind", ["lora", "dora"])
@pytest.mark.parametrize("name", ["conv1d", "conv2d", "conv2d-reflect", "conv3d"])
def test_per_row_equals_one_adapter_at_a_time(name, kind):
    torch.manual_seed(0)
    make, shape = CONVS[name]
    model = nn.Sequential(make())
    for adapter, r in (("a", 2), ("b", 3)):
        add_adapter(model, LoraConfig(r=r, target_modules=["0"], init="random", use_dora=kind == "dora"), adapter)
    perturb(model)
    x = torch.randn(4, *shape[1:])
    rows = ["b", None, "a", "b"]
    single = {}
    for adapter in ("a", "b", None):
        set_active(model, *([adapter] if adapter else []))
        single[adapter] = model(x)
    with torch.no_grad(), per_row_adapters(model, rows):
        mixed = model(x)
    for b, adapter in enumerate(rows):
        torch.testing.assert_close(mixed[b], single[adapter][b], atol=1e-5, rtol=1e-5)


def tiny_resnet():
    torch.manual_seed(0)
    config = ResNetConfig(num_channels=3, embedding_size=8, hidden_sizes=[8, 16], depths=[1, 1], layer_type="basic",
                          num_labels=3)
    return ResNetForImageClassification(config).eval()


class ConvNet(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.c1 = nn.Conv1d(4, 6, 3, padding=1)
        self.c2 = nn.Conv2d(6, 6, 3, stride=2, padding=1)
        self.c3 = nn.Conv3d(6, 3, (1, 1, 1))
        self.head = nn.Linear(3, 2)

    def forward(self, x):  # x: (N, 4, 8)
        h = self.c1(x)
        h = self.c2(h[:, :, None, :].expand(-1, -1, 4, -1).contiguous())
        h = self.c3(h[:, :, None])
        return self.head(h.mean(dim=(2, 3, 4)))


MODELS = {  # make, inputs, targets
    "convnet": (lambda: ConvNet().eval(), lambda: torch.randn(2, 4, 8), ["c1", "c2", "c3"]),
    "resnet": (tiny_resnet, lambda: torch.randn(2, 3, 32, 32), ["convolution"]),
}


def outputs(model, x):
    with torch.no_grad():
        out = model(x)
    return out.logits if hasattr(out, "logits") else out


@pytest.mark.parametrize("dora", [False, True])
@pytest.mark.parametrize("which", MODELS)
def test_lorakit_to_peft_and_back(which, dora, tmp_path):
    make, inputs, targets = MODELS[which]
    x = inputs()
    ours = attach(make(), LoraConfig(r=2, alpha=4, target_modules=targets, use_dora=dora, init="random"))
    perturb(ours)
    expected = outputs(ours, x)
    assert (expected - outputs(make(), x)).abs().max() > 1e-3
    save_adapter(ours, tmp_path)
    theirs = peft.PeftModel.from_pretrained(make(), tmp_path).eval()
    torch.testing.assert_close(outputs(theirs, x), expected, atol=1e-5, rtol=0)
    torch.testing.assert_close(outputs(load_adapter(make(), tmp_path), x), expected, atol=1e-5, rtol=0)
    merge(ours)
    torch.testing.assert_close(outputs(ours, x), expected, atol=1e-5, rtol=0)
    unmerge(ours)


@pytest.mark.parametrize("dora", [False, True])
@pytest.mark.parametrize("which", MODELS)
def test_peft_to_lorakit(which, dora, tmp_path):
    make, inputs, targets = MODELS[which]
    x = inputs()
    theirs = peft.get_peft_model(make(), peft.LoraConfig(r=2, lora_alpha=4, target_modules=targets, use_dora=dora,
                                                         init_lora_weights=False))
    perturb(theirs)
    expected = outputs(theirs.eval(), x)
    theirs.save_pretrained(tmp_path)
    torch.testing.assert_close(outputs(load_adapter(make(), tmp_path), x), expected, atol=1e-5, rtol=0)


def test_inspect_lists_convolutions_and_counts_their_adapter():
    model = tiny_resnet()
    listed = {path: (kind, shape) for path, kind, shape in targetable_modules(model)}
    assert listed["resnet.embedder.embedder.convolution"] == ("Conv2d", (8, 3, 7, 7))
    report = target_footprint(model, rank=4, targets=["convolution"])
    row = next(r for r in report["modules"] if r[0] == "resnet.embedder.embedder.convolution")
    assert row[3] and row[4] == 4 * (8 + 3 * 7 * 7)  # r·(out + in·k·k)


def test_all_linear_leaves_convolutions_out_as_peft_does():
    model = attach(ConvNet(), LoraConfig(r=2, target_modules="all-linear"))
    assert [path for path, _ in lora_layers(model)] == ["head"]
    with pytest.raises(LorakitError, match="all-linear' matched no module.*convolution"):
        attach(tiny_resnet(), LoraConfig(r=2, target_modules="all-linear"))  # only convolutions and the head


def test_grouped_convolutions_are_not_targets():
    torch.manual_seed(0)
    model = ConvNextForImageClassification(ConvNextConfig(num_stages=2, hidden_sizes=[8, 16], depths=[1, 1])).eval()
    listed = {path: shape for path, _, shape in targetable_modules(model)}
    assert "convnext.encoder.stages.0.layers.0.dwconv" not in listed  # depthwise: groups = channels
    assert "convnext.embeddings.patch_embeddings" in listed
    with pytest.raises(LorakitError, match=r"cannot target convnext\.encoder\.stages\.0\.layers\.0\.dwconv, a Conv2d "
                                            r"with groups=8 \(1 more like it\)"):
        attach(model, LoraConfig(target_modules=["dwconv"]))
    with pytest.raises(LorakitError, match="groups=8"):
        LoraConv(nn.Conv2d(8, 8, 3, groups=8))


def test_pissa_on_a_convolution_saves_for_the_original_kernel(tmp_path):
    ours = attach(ConvNet().eval(), LoraConfig(r=2, target_modules=["c1", "c2"], init="pissa"))
    perturb(ours, std=0.02)
    x = torch.randn(2, 4, 8)
    expected = outputs(ours, x)
    save_adapter(ours, tmp_path)
    theirs = peft.PeftModel.from_pretrained(ConvNet().eval(), tmp_path).eval()
    torch.testing.assert_close(outputs(theirs, x), expected, atol=1e-5, rtol=0)


def test_a_bias_on_B_of_a_convolution_round_trips_with_peft_merges_and_goes_per_row(tmp_path):
    """PEFT's lora_bias on convolutions (B, a 1×1 convolution, with a bias): loaded, saved, merged, per row."""
    make, inputs, targets = MODELS["convnet"]
    x = inputs()
    theirs = peft.get_peft_model(make(), peft.LoraConfig(r=2, lora_alpha=4, target_modules=targets, lora_bias=True,
                                                         init_lora_weights=False))
    perturb(theirs)
    expected = outputs(theirs.eval(), x)
    theirs.save_pretrained(tmp_path / "peft")
    ours = load_adapter(make(), tmp_path / "peft")
    torch.testing.assert_close(outputs(ours, x), expected, atol=1e-5, rtol=0)
    layer = ours.c2
    assert isinstance(layer, LoraConv) and layer.adapters["default"].bias.abs().sum() > 0
    save_adapter(ours, tmp_path / "ours")
    again = peft.PeftModel.from_pretrained(make(), tmp_path / "ours").eval()
    torch.testing.assert_close(outputs(again, x), expected, atol=1e-5, rtol=0)
    merge(ours)  # the bias on B lands in the convolution's bias
    torch.testing.assert_close(outputs(ours, x), expected, atol=1e-5, rtol=0)
    unmerge(ours)
    add_adapter(ours, LoraConfig(r=3, target_modules=targets, init="random"), "plain")  # no bias on B
    perturb(ours, seed=1)
    single = {}
    for adapter in ("default", "plain", None):
        set_active(ours, *([adapter] if adapter else []))
        single[adapter] = outputs(ours, x)
    with torch.no_grad(), per_row_adapters(ours, ["plain", "default"]):
        mixed = ours(x)
    torch.testing.assert_close(mixed[0], single["plain"][0], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(mixed[1], single["default"][1], atol=1e-5, rtol=1e-5)
