"""`lorakit approx` and `lorakit rank`, through lorakit.cli.main and one real subprocess."""

import re
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from lorakit.cli import main

SEED_A = np.array([[3.0, 2.0, 1.0], [0.0, 2.0, 1.0], [0.0, 0.0, 1.0]])


def _numbers(line: str) -> list[float]:
    return [float(x) for x in re.findall(r"-?\d+\.\d+", line)]


def _block(out: str, header: str, rows: int) -> np.ndarray:
    lines = out.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith(header))
    return np.array([_numbers(line) for line in lines[start + 1 : start + 1 + rows]])


def test_example_subprocess_walks_through_seed_000():
    exe = shutil.which("lorakit")
    cmd = [exe, "approx", "--example"] if exe else [sys.executable, "-m", "lorakit", "approx", "--example"]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    out = done.stdout
    assert "Σ = diag(4.04, 1.70, 0.87)" in out
    np.testing.assert_allclose(_block(out, "U =", 3), [[0.91, 0.42, 0.02], [0.41, -0.88, -0.26], [0.09, -0.24, 0.97]])
    np.testing.assert_allclose(_block(out, "B = U_r (3×2)", 3), [[0.91, 0.42], [0.41, -0.88], [0.09, -0.24]])
    approx = _block(out, "rank-2 approximation", 3)
    np.testing.assert_allclose(approx, [[3.00, 2.01, 0.98], [0.02, 1.88, 1.19], [-0.07, 0.45, 0.29]])
    assert re.search(r"Frobenius\s+0\.87\s+0\.87", out)
    assert re.search(r"spectral\s+0\.87\s+0\.87\s+= σ_3", out)
    assert re.search(r"5000×100\s+20\s+500,000\s+102,000\s+79\.6%", out)
    assert re.search(r"5000×100\s+10\s+500,000\s+51,000\s+89\.8%", out)
    assert re.search(r"512×64\s+8\s+32,768\s+4,608\s+85\.9%", out)
    assert done.stderr == ""


def test_approx_csv_with_rank(tmp_path, capsys):
    path = tmp_path / "a.csv"
    path.write_text("# seed 000\n3, 2, 1\n0, 2, 1\n\n0, 0, 1\n")
    assert main(["approx", str(path), "--rank", "2"]) == 0
    out = capsys.readouterr().out
    assert "A: 3×3 float64" in out
    assert "singular values (3): 4.0423, 1.7028, 0.8717" in out
    np.testing.assert_allclose(_block(out, "rank-2 approximation", 3),
                               [[2.9983, 2.0109, 0.9827], [0.0181, 1.8813, 1.1878], [-0.0684, 0.4487, 0.2903]])
    B = _block(out, "B = U_r Σ_r^½ (3×2)", 3)
    Ct = _block(out, "Cᵀ = Σ_r^½ V_rᵀ (2×3)", 2)
    np.testing.assert_allclose(B @ Ct, SEED_A, atol=0.9)  # a rank-2 product close to A
    assert re.search(r"Frobenius\s+0\.8717\s+0\.8717", out)
    assert re.search(r"3×3\s+2\s+9\s+12\s+-33\.3%", out)


def test_approx_energy_picks_rank_and_large_matrices_are_summarised(tmp_path, capsys):
    rng = np.random.default_rng(0)
    U, _ = np.linalg.qr(rng.standard_normal((40, 30)))
    V, _ = np.linalg.qr(rng.standard_normal((30, 30)))
    sigma = np.array([10.0, 5.0, 2.0] + [0.01] * 27)
    path = tmp_path / "a.npy"
    np.save(path, (U * sigma) @ V.T)
    assert main(["approx", str(path), "--energy", "0.95"]) == 0
    out = capsys.readouterr().out
    assert "rank 2 chosen: the smallest keeping ≥ 95% of the energy Σσ²" in out  # 100+25 of 129
    assert "B: 40×2 and Cᵀ: 2×30 (not printed" in out
    assert "rank-2 approximation" not in out
    assert re.search(r"40×30\s+2\s+1,200\s+140\s+88\.3%", out)


def test_approx_safetensors_with_key_and_plot(tmp_path, capsys):
    path = tmp_path / "w.safetensors"
    save_file({"q.weight": torch.tensor(SEED_A, dtype=torch.float32), "bias": torch.ones(3)}, str(path))
    png = tmp_path / "figs" / "spectrum.png"
    assert main(["approx", str(path), "--key", "q.weight", "-r", "1", "--plot", str(png)]) == 0
    out = capsys.readouterr().out
    assert "A: 3×3 float32" in out and "[q.weight]" in out
    assert f"spectrum written to {png}" in out
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert png.stat().st_size > 10_000
    assert [p.name for p in png.parent.iterdir()] == ["spectrum.png"]  # no temp file left
    # a file already there is not drawn over unless asked
    photo = tmp_path / "photo.png"
    photo.write_bytes(b"a user's picture")
    assert main(["approx", str(path), "--key", "q.weight", "-r", "1", "--plot", str(photo)]) == 2
    assert "--plot " + str(photo) + " exists; give another name, or --overwrite" in capsys.readouterr().err
    assert photo.read_bytes() == b"a user's picture"
    assert main(["approx", str(path), "--key", "q.weight", "-r", "1", "--plot", str(photo), "--overwrite"]) == 0
    assert photo.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_rank_verb(tmp_path, capsys):
    path = tmp_path / "m.txt"
    path.write_text("1 2 3\n2 4 6\n1 3 5\n")
    assert main(["rank", str(path)]) == 0
    out = capsys.readouterr().out
    assert out.splitlines()[0] == "numerical rank: 2"
    assert "3×3 matrix, full rank would be 3" in out
    npz = tmp_path / "m.npz"
    np.savez(npz, a=np.outer([1.0, 2, 3], [1.0, 2]))
    assert main(["rank", str(npz)]) == 0
    assert capsys.readouterr().out.startswith("numerical rank: 1\n")
    assert main(["rank", str(path), "--tol", "1"]) == 0
    assert capsys.readouterr().out.startswith("numerical rank: 1\n")  # σ ≈ 9.5, 0.7, 0


def _write(tmp_path, name, content):
    path = tmp_path / name
    if isinstance(content, str):
        path.write_text(content)
    elif isinstance(content, dict):
        save_file(content, str(path))
    else:
        np.save(path, content)
    return str(path)


BAD = [
    ("nonnumeric", ["approx", "{p}", "-r", "1"], ("a.csv", "1,2\n3,x\n"), "line 2, column 2: 'x' is not a number"),
    ("ragged", ["approx", "{p}", "-r", "1"], ("a.csv", "1,2,3\n4,5\n"), "ragged: line 2 has 2 values but line 1 has 3"),
    ("nan", ["approx", "{p}", "-r", "1"], ("a.csv", "1,nan\n3,4\n"), "NaN/Inf value(s), the first nan at row 0, column 1"),
    ("inf", ["rank", "{p}"], ("a.npy", np.array([[1.0, np.inf]])), "the first inf at row 0, column 1"),
    ("empty_csv", ["approx", "{p}", "-r", "1"], ("a.csv", "# nothing\n\n"), "holds no numbers"),
    ("empty_npy", ["approx", "{p}", "-r", "1"], ("a.npy", np.zeros((0, 4))), "is empty (shape (0, 4))"),
    ("3d", ["approx", "{p}", "-r", "1"], ("a.npy", np.zeros((2, 2, 2))), "3 dimension(s) with shape (2, 2, 2)"),
    ("rank0", ["approx", "{p}", "-r", "0"], ("a.csv", "1,2\n3,4\n"), "rank 0 is out of range for a 2×2 matrix"),
    ("rank_big", ["approx", "{p}", "-r", "3"], ("a.csv", "1,2\n3,4\n"), "choose 1 ≤ rank ≤ 2"),
    ("energy", ["approx", "{p}", "--energy", "1.5"], ("a.csv", "1,2\n3,4\n"), "energy must be a fraction in (0, 1], got 1.5"),
    ("missing_key", ["approx", "{p}", "--key", "nope", "-r", "1"], ("w.safetensors", {"w": torch.ones(2, 2)}),
     "has no array 'nope'; it holds 'w'"),
    ("ambiguous", ["rank", "{p}"], ("w.safetensors", {"a": torch.ones(2, 2), "b": torch.ones(2, 2)}),
     "holds 2 arrays ('a', 'b'); pick one with --key NAME"),
    ("missing_file", ["approx", "{dir}/nope.csv", "-r", "1"], None, "nope.csv' does not exist"),
    ("format", ["rank", "{p}"], ("a.xlsx", "1"), "cannot tell the format"),
    ("corrupt_npy", ["rank", "{p}"], ("a.npy", "not numpy"), "cannot read"),
    ("no_file", ["approx", "-r", "1"], None, "give a matrix FILE"),
    ("split", ["approx", "{p}", "-r", "1", "--split", "up"], ("a.csv", "1,2\n3,4\n"), "--split 'up' is not one of sqrt, left, right"),
    ("digits", ["approx", "--example", "--digits", "-1"], None, "--digits must be ≥ 0, got -1"),
    ("example_and_file", ["approx", "{p}", "--example"], ("a.csv", "1\n"), "--example takes no FILE"),
    ("plot_suffix", ["approx", "{p}", "-r", "1", "--plot", "{dir}/x.gif"], ("a.csv", "1,2\n3,4\n"), "end the name with .png"),
]


@pytest.mark.parametrize("argv, file, message", [case[1:] for case in BAD], ids=[case[0] for case in BAD])
def test_bad_input_exits_2_with_one_line(tmp_path, capsys, argv, file, message):
    path = _write(tmp_path, *file) if file else ""
    code = main([a.format(p=path, dir=tmp_path) for a in argv])
    captured = capsys.readouterr()
    assert code == 2
    lines = captured.err.splitlines()
    assert len(lines) == 1, captured.err
    assert lines[0].startswith(f"lorakit {argv[0]}: error: ")
    assert message in lines[0]
