"""LoRA+ parameter groups: the same learning rate and weight decay for every parameter as PEFT's
``create_loraplus_optimizer``, and ``lorakit train --loraplus-ratio`` moving B that much faster."""

import pytest
import torch
from safetensors.torch import load_file

from lorakit import LoraConfig, LorakitError, attach
from lorakit.optimizer import loraplus_param_groups
from lorakit.train import TrainConfig, train
from tiny_models import tiny_bert_classifier

peft = pytest.importorskip("peft")

TARGETS = ["query", "value", "word_embeddings"]


def _peft_name(name: str) -> str:
    """lorakit's parameter name -> PEFT's, for the layouts of this test."""
    name = (name.replace(".adapters.default.A", ".lora_A.default.weight")
            .replace(".adapters.default.B", ".lora_B.default.weight")
            .replace(".copies.default.", ".modules_to_save.default."))
    if "word_embeddings.lora_" in name:
        name = name.replace(".lora_A.default.weight", ".lora_embedding_A.default")
        name = name.replace(".lora_B.default.weight", ".lora_embedding_B.default")
    if name.endswith(("query.bias", "value.bias")):
        name = name[:-len("bias")] + "base_layer.bias"
    return "base_model.model." + name


def _settings(optimizer_or_groups, names: dict) -> dict:
    groups = optimizer_or_groups if isinstance(optimizer_or_groups, list) else optimizer_or_groups.param_groups
    return {names[id(p)]: (g["lr"], g["weight_decay"]) for g in groups for p in g["params"]}


def test_groups_equal_peft_create_loraplus_optimizer():
    from peft.optimizers import create_loraplus_optimizer

    ours = attach(tiny_bert_classifier(), LoraConfig(r=4, target_modules=TARGETS, modules_to_save=["classifier"],
                                                     bias="lora_only"))
    theirs = peft.get_peft_model(tiny_bert_classifier(), peft.LoraConfig(
        r=4, target_modules=TARGETS, modules_to_save=["classifier"], bias="lora_only", task_type="SEQ_CLS"))
    groups = loraplus_param_groups(ours, lr=1e-3, ratio=16, weight_decay=0.01)
    optimizer = create_loraplus_optimizer(theirs, torch.optim.AdamW, lr=1e-3, loraplus_lr_ratio=16,
                                          loraplus_weight_decay=0.01)
    ours_by_name = _settings(groups, {id(p): _peft_name(n) for n, p in ours.named_parameters()})
    theirs_by_name = _settings(optimizer, {id(p): n for n, p in theirs.named_parameters()})
    assert ours_by_name == theirs_by_name
    # what was compared: every kind of parameter LoRA+ treats apart
    assert {g["name"]: len(g["params"]) for g in groups} == {"A": 5, "embedding": 2, "B": 4, "B_no_decay": 5}
    assert ours_by_name["base_model.model.classifier.modules_to_save.default.weight"] == (1e-3, 0.01)
    assert ours_by_name["base_model.model.bert.encoder.layer.0.attention.self.query.lora_B.default.weight"] \
        == (16e-3, 0.01)
    assert ours_by_name["base_model.model.bert.embeddings.word_embeddings.lora_embedding_B.default"] == (1e-6, 0.01)


def test_every_trainable_parameter_is_in_one_group_and_bad_ratios_raise():
    model = attach(tiny_bert_classifier(), LoraConfig(r=2, target_modules=["query"]))
    groups = loraplus_param_groups(model, lr=1e-3, ratio=4)
    grouped = [id(p) for g in groups for p in g["params"]]
    assert sorted(grouped) == sorted(id(p) for p in model.parameters() if p.requires_grad)
    for bad in (0, -2, True, "16"):
        with pytest.raises(LorakitError, match="loraplus ratio must be a positive number"):
            loraplus_param_groups(model, lr=1e-3, ratio=bad)


def test_train_with_loraplus_ratio_moves_b_ratio_times_faster(tmp_path):
    """One AdamW step moves each entry by about its lr: with lr 1e-9 and ratio 1e7, B (starting at 0)
    ends near 1e-2 while the plain run leaves it near 1e-9."""
    from tiny_training import save_tiny_classifier, write_jsonl

    data = write_jsonl(tmp_path / "data.jsonl", [{"text": f"{w} movie {i // 10} {i % 10}", "label": w}
                                                  for i, w in enumerate(["good", "bad"] * 20)])
    model = save_tiny_classifier(tmp_path / "model")
    largest_b = {}
    for ratio in (None, 1e7):
        out = tmp_path / f"run-{ratio}"
        report = train(TrainConfig(model=str(model), data=str(data), steps=1, batch_size=8, lr=1e-9, warmup=0,
                                   loraplus_ratio=ratio, bf16=False, out=str(out), progress=False))
        assert report["settings"]["loraplus_ratio"] == ratio
        saved = load_file(str(out / "adapter" / "adapter_model.safetensors"))
        largest_b[ratio] = max(float(t.abs().max()) for k, t in saved.items() if "lora_B" in k)
    assert largest_b[None] < 1e-8
    assert 5e-3 < largest_b[1e7] < 2e-2


def test_train_config_refuses_loraplus_where_it_has_no_meaning(tmp_path):
    with pytest.raises(LorakitError, match="--loraplus-ratio must be a positive number with --method lora"):
        TrainConfig(method="full", loraplus_ratio=16)
    with pytest.raises(LorakitError, match="got -1"):
        TrainConfig(loraplus_ratio=-1)
    from lorakit.cli import build_parser

    assert build_parser().parse_args(["train", "--loraplus-ratio", "16"]).loraplus_ratio == 16
