"""`lorakit combine`: adapter folders in, one PEFT-format folder out; mistakes are one line, exit 2."""

import pytest
import torch

from lorakit import LoraConfig, add_adapter, attach, combine, load_adapter, save_adapter, set_active
from lorakit.cli import main
from tiny_models import tiny_llama, token_batch

peft = pytest.importorskip("peft")


@pytest.fixture
def folders(tmp_path):
    model = tiny_llama()
    attach(model, LoraConfig(r=4, alpha=8, target_modules=["q_proj", "v_proj"], init="random"), "a")
    add_adapter(model, LoraConfig(r=2, alpha=2, target_modules=["q_proj", "o_proj"], init="random"), "b")
    save_adapter(model, tmp_path / "a", "a")
    save_adapter(model, tmp_path / "b", "b")
    return model, tmp_path / "a", tmp_path / "b"


def test_combine_writes_an_adapter_lorakit_and_peft_load(folders, tmp_path, capsys):
    model, a, b = folders
    out = tmp_path / "c"
    code = main(["combine", "--adapter", f"{a}=0.5", "--adapter", f"{b}=0.5", "--method", "ties",
                 "--density", "0.5", "--out", str(out)])
    assert code == 0
    assert f"combined 2 adapters by ties: {out}" in capsys.readouterr().out
    combine(model, {"a": 0.5, "b": 0.5}, method="ties", name="c", density=0.5)  # rank: the largest input rank, 4
    set_active(model, "c")
    x = token_batch()
    with torch.no_grad():
        expected = model(x).logits
        ours = load_adapter(tiny_llama(), out).eval()(x).logits
        theirs = peft.PeftModel.from_pretrained(tiny_llama(), out).eval()(x).logits
    torch.testing.assert_close(ours, expected, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(theirs, expected, rtol=1e-5, atol=1e-5)
    from lorakit.io import lora_factors, read_adapter

    config, tensors = read_adapter(out)
    # the largest input rank (a's 4) everywhere, also where only b's rank-2 adapter was (o_proj)
    assert config.r == 4 and not config.rank_pattern
    assert {A.shape[0] for A, _ in lora_factors(tensors).values()} == {4}
    assert any(p.endswith("o_proj") for p in lora_factors(tensors))


def test_a_run_folder_stands_for_its_adapter(folders, tmp_path):
    """As eval, predict, generate and export take it: the folder lorakit train wrote, for its adapter/."""
    import json
    import shutil

    from lorakit.run_folder import TASK_FILE, RunFolder

    _, a, b = folders
    runs = {}
    for name, adapter in (("run_a", a), ("run_b", b)):
        run = RunFolder(tmp_path / name)
        run.mark()

        def write(tmp, adapter=adapter):
            shutil.copytree(adapter, tmp, dirs_exist_ok=True)
            (tmp / TASK_FILE).write_text(json.dumps({"task": "chat", "method": "lora"}))

        run.save_result("adapter", write)
        runs[name] = run.root
    assert main(["combine", "--adapter", f"{runs['run_a']}=0.5", "--adapter", f"{runs['run_b']}=0.5", "--out",
                 str(tmp_path / "from_runs")]) == 0
    assert main(["combine", "--adapter", f"{a}=0.5", "--adapter", f"{b}=0.5", "--out", str(tmp_path / "direct")]) == 0
    from lorakit.io import read_adapter

    (config_runs, from_runs), (config_direct, direct) = read_adapter(tmp_path / "from_runs"), read_adapter(
        tmp_path / "direct")
    assert config_runs == config_direct and from_runs.keys() == direct.keys()
    assert all(torch.equal(from_runs[k], direct[k]) for k in direct)


def test_dare_is_seeded_and_rank_is_honoured(folders, tmp_path):
    _, a, b = folders
    args = ["combine", "--adapter", f"{a}=1", "--adapter", f"{b}=-0.5", "--method", "dare_ties", "--density", "0.7",
            "--rank", "3"]
    assert main([*args, "--out", str(tmp_path / "s1")]) == 0
    assert main([*args, "--out", str(tmp_path / "s2")]) == 0
    assert main([*args, "--seed", "9", "--out", str(tmp_path / "s3")]) == 0
    from lorakit.io import read_adapter

    config, first = read_adapter(tmp_path / "s1")
    _, second = read_adapter(tmp_path / "s2")
    _, third = read_adapter(tmp_path / "s3")
    assert config.r == 3 and all(t.shape[0] == 3 for k, t in first.items() if "lora_A" in k)
    assert all(torch.equal(first[k], second[k]) for k in first)
    assert any(not torch.allclose(first[k], third[k]) for k in first)


@pytest.mark.parametrize("extra, message", [
    (["--method", "ties"], "method 'ties' needs a density in (0, 1]"),
    (["--method", "mean"], "combine method 'mean' is unknown"),
    (["--method", "cat", "--rank", "4"], "rank does not apply to method 'cat'"),
    (["--method", "ties", "--density", "0.5", "--majority-sign", "most"], "majority_sign 'most' is unknown"),
])
def test_bad_options_are_one_line_exit_2(folders, tmp_path, capsys, extra, message):
    _, a, b = folders
    code = main(["combine", "--adapter", f"{a}=1", "--adapter", f"{b}=1", *extra, "--out", str(tmp_path / "x")])
    err = capsys.readouterr().err
    assert code == 2 and message in err and err.count("\n") == 1
    assert not (tmp_path / "x").exists()


def test_bad_adapter_arguments_are_one_line_exit_2(folders, tmp_path, capsys):
    _, a, b = folders
    for adapter, message in ((str(a), "needs a weight: give DIR=WEIGHT"), (f"{a}=half", "'half' is not a number"),
                             (f"{tmp_path / 'nope'}=1", "does not exist")):
        code = main(["combine", "--adapter", adapter, "--adapter", f"{b}=1", "--out", str(tmp_path / "x")])
        err = capsys.readouterr().err
        assert code == 2 and message in err and err.count("\n") == 1, err
    assert main(["combine", "--adapter", f"{a}=1", "--adapter", f"{a}=2", "--out", str(tmp_path / "x")]) == 2
    assert "given twice" in capsys.readouterr().err
