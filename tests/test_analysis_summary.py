"""lorakit.analysis.summary and `lorakit inspect ADAPTER`: what an adapter folder holds, without its base."""

import json

import peft
import torch

from lorakit import LoraConfig, attach, save_adapter
from lorakit.analysis.summary import adapter_summary
from lorakit.cli import main
from lorakit.run_folder import RunFolder
from tiny_models import tiny_bert_classifier, tiny_llama, tiny_mixtral


def _perturbed(model):
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.requires_grad:
                p.normal_(generator=g)
    return model


def test_the_summary_reads_ranks_scales_norms_and_parameters_from_the_files(tmp_path):
    config = LoraConfig(r=4, alpha=8, target_modules=["query", "value"], rank_pattern={"value": 2},
                        modules_to_save=["classifier"], init="random")
    model = _perturbed(attach(tiny_bert_classifier(), config))
    RunFolder(tmp_path / "run").mark()
    save_adapter(model, tmp_path / "run" / "adapter")
    (tmp_path / "run" / "adapter" / "lorakit_task.json").write_text(json.dumps(
        {"task": "classify", "method": "lora", "labels": ["neg", "neutral", "pos"], "max_length": 32}))
    summary = adapter_summary(tmp_path / "run")  # a run folder stands for its adapter
    assert summary.folder == tmp_path / "run" / "adapter" and summary.task["labels"] == ["neg", "neutral", "pos"]
    layers = dict(model.named_modules())
    for m in summary.modules:
        adapter = layers[m.path].adapters["default"]
        expected = torch.linalg.matrix_norm(m.scaling * adapter.B.double() @ adapter.A.double())
        assert m.rank == (2 if m.path.endswith("value") else 4) and m.scaling == (8 / m.rank)
        assert abs(m.delta_norm - float(expected)) < 1e-9 * float(expected)
    assert summary.lora_params == sum(p.numel() for n, p in model.named_parameters() if ".A" in n or ".B" in n)
    assert summary.other_params == sum(p.numel() for p in tiny_bert_classifier().classifier.parameters())  # the head


def test_inspect_prints_an_adapter_peft_wrote(tmp_path, capsys):
    theirs = peft.get_peft_model(tiny_llama(), peft.LoraConfig(r=4, lora_alpha=16, target_modules=["q_proj", "v_proj"],
                                                                use_dora=True, task_type="CAUSAL_LM"))
    _perturbed(theirs).save_pretrained(tmp_path / "peft")
    assert main(["inspect", str(tmp_path / "peft")]) == 0
    out = capsys.readouterr().out
    assert "method      DoRA r=4 alpha=16, rank 4 as saved, scale s = 4, task_type CAUSAL_LM" in out
    layers = tiny_llama().config.num_hidden_layers
    assert out.count("\nq_proj ") == 1 and f"q_proj  {layers}      4" in out
    magnitudes = sum(p.numel() for n, p in theirs.named_parameters() if "magnitude" in n)
    assert f"{magnitudes:,} more (saved whole: none)" in out  # DoRA's magnitudes are what else it holds
    assert main(["inspect", str(tmp_path / "peft"), "--paths"]) == 0
    assert "model.layers.0.self_attn.q_proj" in capsys.readouterr().out


def test_lora_on_expert_parameters_is_read_per_expert(tmp_path):
    """PEFT's target_parameters: each expert's rank-r factors inside one (E·r) pair, one pair per parameter."""
    from lorakit import load_adapter
    from lorakit.targets import parameter_hosts

    config = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj"],
                             target_parameters=["experts.gate_up_proj", "experts.down_proj"], task_type="CAUSAL_LM")
    _perturbed(peft.get_peft_model(tiny_mixtral(), config)).save_pretrained(tmp_path)
    loaded = load_adapter(tiny_mixtral(), tmp_path)
    expected = {}  # module order: gate_up_proj is the experts' first parameter, down_proj the second
    for path, host in parameter_hosts(loaded):
        for i, (name, layer) in enumerate(host.lora_parameters.items()):
            expected[f"{path}.parameter{i + 1}of2"] = (float(layer.delta_weight("default").norm()), layer.experts)
    got = {m.path: m for m in adapter_summary(tmp_path).modules if "experts" in m.path}
    assert set(got) == set(expected) and len(got) == 2 * tiny_mixtral().config.num_hidden_layers
    for path, (norm, experts) in expected.items():
        assert got[path].rank == 4 and got[path].experts == experts > 1
        assert abs(got[path].delta_norm - norm) < 1e-4 * norm
