"""Figures and numbers of docs/choosing-rank.md, from the runs the study's commands leave in STUDY.

    python docs/figures/make_choosing_rank.py STUDY [DATA]
    SECTIONS=sweep,similarity python docs/figures/make_choosing_rank.py STUDY   # only some

STUDY holds ``sweep/`` (lorakit sweep), ``sweep-seed1/``, ``full/`` (lorakit train --method full)
and ``adalora/``; DATA the folder with validation.jsonl the runs were scored on. Writes the
PNGs beside this script and prints every number the page quotes as JSON.
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch

from lorakit.analysis import adapter_amplification, compare_adapters, extract_adapter, model_spectra
from lorakit.analysis.similarity import random_baseline
from lorakit.plots import plot_amplification, plot_delta_spectra, plot_similarity, save_figure

HERE = Path(__file__).parent


def _short(path: str) -> str:
    """``bert.encoder.layer.3.attention.self.value`` -> ``L3.value``."""
    return path.replace("bert.encoder.layer.", "L").replace(".attention.self.", ".")


def accuracy(model, tokenizer, records, order: list[str], batch=64) -> float:
    """Fraction of ``records`` whose label (``order[i]`` is class i's name) the classifier predicts."""
    index = {name: i for i, name in enumerate(order)}
    correct = 0
    model.eval()
    with torch.no_grad():
        for i in range(0, len(records), batch):
            chunk = records[i:i + batch]
            enc = tokenizer([r["text"] for r in chunk], padding=True, truncation=True, max_length=64,
                            return_tensors="pt")
            pred = model(**enc).logits.argmax(-1)
            gold = torch.tensor([index[r["label"]] for r in chunk])
            correct += int((pred == gold).sum())
    return correct / len(records)


def similarity_section(study: Path, out: dict) -> None:
    sweep = study / "sweep"
    r8, r64 = sweep / "query+value-r8" / "adapter", sweep / "query+value-r64" / "adapter"
    seed1 = study / "sweep-seed1"
    panels = {}
    for factor in ("A", "B"):
        res = compare_adapters(r8, r64, factor=factor)
        out[f"phi_{factor}_r8_r64"] = summarize_phi(res)
        shown = [m for m in res if m.path.endswith(("layer.0.attention.self.query", "layer.0.attention.self.value",
                                                     "layer.5.attention.self.query", "layer.5.attention.self.value"))]
        plot_similarity(shown, HERE / f"choosing-rank-phi-{factor}-r8-r64.png",
                        title=f"φ(i, j) between the {factor} of the r = 8 (i) and r = 64 (j) query+value adapters")
        curves = {"r = 8 vs r = 64": res}
        for rank, ours in (("8", r8), ("64", r64)):
            other = seed1 / f"query+value-r{rank}" / "adapter"
            if other.is_dir():
                res_seeds = compare_adapters(ours, other, factor=factor)
                out[f"phi_{factor}_r{rank}_seeds"] = summarize_phi(res_seeds)
                curves[f"r = {rank}, seed 0 vs seed 1"] = res_seeds
        panels[factor] = curves
    plot_phi_curves(panels, HERE / "choosing-rank-phi-curves.png")


def summarize_phi(results) -> dict:
    phi = torch.stack([m.phi for m in results])  # (modules, k1, k2)
    k1, k2 = phi.shape[1:]
    n = results[0].dim
    mean = phi.mean(0)
    return {
        "modules": len(results), "k1": k1, "k2": k2, "n": n,
        "phi_11_mean": float(mean[0, 0]), "phi_11_min": float(phi[:, 0, 0].min()),
        "phi_11_max": float(phi[:, 0, 0].max()),
        "phi_diag_mean": [round(float(mean[i, i]), 3) for i in range(min(k1, k2))],
        "phi_i_kmax_mean": [round(float(mean[i, -1]), 3) for i in range(k1)],
        "phi_1_j_mean": [round(float(mean[0, j]), 3) for j in (0, 1, 3, 7, min(15, k2 - 1), k2 - 1)],
        "random_diag": [round(random_baseline(i + 1, i + 1, n), 4) for i in range(min(k1, k2))],
        "by_module_phi_11": {_short(m.path): round(m.top, 3) for m in results},
    }


def plot_phi_curves(panels: dict, path: Path) -> None:
    """One panel per factor: mean φ(i, i) over modules against i, beside random subspaces (i/n)."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(12, 4.5), layout="constrained")
    axes = fig.subplots(1, len(panels), squeeze=False)[0]
    for ax, (factor, curves) in zip(axes, panels.items()):
        n = None
        for i, (label, results) in enumerate(curves.items()):
            phi = torch.stack([m.phi for m in results]).mean(0)
            k = min(phi.shape)
            n = results[0].dim
            ax.plot(range(1, k + 1), phi.diagonal()[:k].numpy(), marker="o", ms=3, color=f"C{i}", label=label)
        ks = np.arange(1, 65)
        ax.plot(ks, ks / n, color="gray", linestyle="--", label="random subspaces (i / n)")
        ax.set_xscale("log", base=2)
        ax.set_xlabel("i (leading directions compared)")
        ax.set_ylabel("φ(i, i), mean over the 12 query/value modules")
        ax.set_ylim(0, 1.02)
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=8)
        what = "A: input directions" if factor == "A" else "B: output directions"
        ax.set_title(f"{what}")
    fig.suptitle("Agreement of learned subspaces beyond the first directions")
    save_figure(fig, path)


def amplification_section(study: Path, out: dict) -> None:
    from lorakit.analysis.weights import load_model

    base = load_model("default")
    out["amplification"] = {}
    for name in ("query+value-r8", "query+value-r64", "query+value-r1"):
        folder = study / "sweep" / name / "adapter"
        if not folder.is_dir():
            continue
        res = adapter_amplification(folder, base)
        rows = list(res.values())
        out["amplification"][name] = {
            "factor_median": float(np.median([a.factor for a in rows])),
            "factor_range": [float(min(a.factor for a in rows)), float(max(a.factor for a in rows))],
            "over_random_median": float(np.median([a.over_random for a in rows])),
            "over_expected_random_median": float(np.median([a.along_delta / a.expected_random for a in rows])),
            "along_delta_over_along_weight_median": float(np.median([a.along_delta / a.along_weight for a in rows])),
            "delta_norm_median": float(np.median([a.delta_norm for a in rows])),
            "weight_norm_median": float(np.median([a.weight_norm for a in rows])),
            "by_module": {_short(p): {"r": a.rank, "dW": round(a.delta_norm, 3), "W_along_dW": round(a.along_delta, 3),
                           "W_along_W": round(a.along_weight, 3), "W_along_random": round(a.along_random, 3),
                          "W_along_random_expected": round(a.expected_random, 3),
                           "factor": round(a.factor, 2)} for p, a in res.items()},
        }
        if name == "query+value-r8":
            plot_amplification(res, HERE / "choosing-rank-amplification-r8.png",
                               title="W projected on r = 8 directions (query+value adapter, r = 8)")


def spectrum_section(study: Path, data: Path, out: dict) -> None:
    from lorakit.analysis.weights import load_model
    from lorakit.io import load_adapter
    from lorakit.models import load_classifier

    full = study / "full" / "model"
    spectra = model_spectra("default", full)
    plot_delta_spectra(spectra, HERE / "choosing-rank-spectrum-full.png",
                       title="Spectrum of ΔW = W_ft − W after a 150-step full fine-tune")
    ranks = {e: [s.ranks[e] for s in spectra.values()] for e in (0.9, 0.95, 0.99)}
    qv = {e: [s.ranks[e] for p, s in spectra.items() if p.endswith(("query", "value"))] for e in (0.9, 0.95, 0.99)}
    out["spectrum"] = {
        "modules": len(spectra), "p": [s.full_rank for s in spectra.values()][:1],
        "rank_median": {str(e): int(np.median(v)) for e, v in ranks.items()},
        "rank_range": {str(e): [int(min(v)), int(max(v))] for e, v in ranks.items()},
        "query_value_rank_median": {str(e): int(np.median(v)) for e, v in qv.items()},
        "relative_change_median": float(np.median([s.relative_change for s in spectra.values()])),
        "top1_energy_median": float(np.median([float(s.energy()[0]) for s in spectra.values()])),
        "top8_energy_median": float(np.median([float(s.energy()[7]) for s in spectra.values()])),
    }
    # Extracted adapters against the full fine-tune, all scored on the validation reviews.
    records = [json.loads(line) for line in (data / "validation.jsonl").read_text().splitlines()]
    tuned, tok = load_classifier(str(full))
    order = [tuned.config.id2label[i] for i in sorted(tuned.config.id2label)]
    out["extract"] = {"labels": order, "full_fine_tune": accuracy(tuned, tok, records, order)}
    for label, kw in (("r=1", {"rank": 1}), ("r=8", {"rank": 8}), ("r=64", {"rank": 64}),
                      ("energy 0.90", {"energy": 0.90}), ("energy 0.99", {"energy": 0.99}),
                      ("full rank", {"rank": 10_000}), ("query+value r=8", {"rank": 8, "module": r"(query|value)$"})):
        with tempfile.TemporaryDirectory() as tmp:
            ex = extract_adapter("default", full, Path(tmp) / "ad", **kw)
            torch.manual_seed(0)
            model = load_model("default", num_labels=2)
            load_adapter(model, Path(tmp) / "ad")
            out["extract"][label] = {"accuracy": accuracy(model, tok, records, order), "params": ex.parameters,
                                     "relative_error": round(ex.relative_error, 4)}


def sweep_section(study: Path, out: dict) -> None:
    rows = [json.loads(line) for line in (study / "sweep" / "sweep.jsonl").read_text().splitlines() if line.strip()]
    out["sweep"] = [{k: r[k] for k in ("targets", "rank", "trainable_params", "points", "train_time_s")} for r in rows]
    from lorakit.sweep import choose_smallest

    chosen = choose_smallest(rows, 0.5)
    out["sweep_chosen"] = {k: chosen[k] for k in ("targets", "rank", "trainable_params", "points")}
    from lorakit.plots import plot_sweep

    plot_sweep([{**r, "metric": r["points"]} for r in rows], HERE / "choosing-rank-sweep.png",
               metric="validation accuracy (%)", chosen={**chosen, "metric": chosen["points"]})
    longer = study / "sweep300" / "sweep.jsonl"
    if longer.is_file():
        rows300 = [json.loads(line) for line in longer.read_text().splitlines() if line.strip()]
        out["sweep300"] = [{k: r[k] for k in ("targets", "rank", "trainable_params", "points", "train_time_s")}
                           for r in rows300]
    seed1 = study / "sweep-seed1" / "sweep.jsonl"
    if seed1.is_file():
        out["sweep_seed1"] = [{k: json.loads(line)[k] for k in ("targets", "rank", "points")}
                              for line in seed1.read_text().splitlines() if line.strip()]


def adalora_section(study: Path, out: dict) -> None:
    report = study / "adalora" / "report.json"
    if not report.is_file():
        return
    rep = json.loads(report.read_text())
    cfg = json.loads((study / "adalora" / "adapter" / "adapter_config.json").read_text())
    ranks = {p: cfg["rank_pattern"].get(p, cfg["r"]) for p in cfg["target_modules"]}
    out["adalora"] = {"accuracy": rep["validation_after"]["accuracy"], "best_step": rep["best_step"],
                      "trainable_params": rep["trainable_params"], "train_time_s": rep["train_time_s"],
                      "total_rank": sum(ranks.values()), "modules_kept": len(ranks),
                      "ranks": {_short(p): r for p, r in ranks.items()}}


def main(argv):
    study = Path(argv[1])
    data = Path(argv[2]) if len(argv) > 2 else Path("/tmp/ek/rt")
    out: dict = {}
    sections = {"sweep": lambda: sweep_section(study, out), "similarity": lambda: similarity_section(study, out),
                "amplification": lambda: amplification_section(study, out),
                "adalora": lambda: adalora_section(study, out), "spectrum": lambda: spectrum_section(study, data, out)}
    chosen = [s for s in os.environ.get("SECTIONS", ",".join(sections)).split(",") if s]
    for name in chosen:
        try:
            sections[name]()
        except FileNotFoundError as err:  # a run not finished yet: leave its section out
            print(f"skipped: {err}", file=sys.stderr)
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main(sys.argv)
