"""lorakit's figures, one function per figure, each saved atomically to a PNG (or PDF/SVG).

matplotlib is imported inside the functions, and only its object-oriented API with the
Agg canvas is used (no pyplot, no global backend switch), so importing lorakit stays
fast and figures render on machines without a display.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from lorakit import atomic
from lorakit.errors import LorakitError

__all__ = ["figure_format", "plot_spectrum", "save_figure"]

FORMATS = ("png", "pdf", "svg")


def figure_format(path) -> str:
    """The image format named by ``path``'s suffix (png, pdf or svg), or LorakitError."""
    fmt = Path(path).suffix.lower().lstrip(".")
    if fmt not in FORMATS:
        raise LorakitError(f"cannot save a figure as {str(path)!r}; end the name with .png, .pdf or .svg")
    return fmt


def check_figure_path(path, overwrite: bool = False) -> None:
    """Refuse, before any work, a figure ``path`` with a suffix that is no image format, or naming a file that
    exists unless ``overwrite`` (a figure is written over nothing of the user's without being asked)."""
    figure_format(path)
    if Path(path).exists() and not overwrite:
        raise LorakitError(f"--plot {path} exists; give another name, or --overwrite to replace it")


def save_figure(fig, path) -> Path:
    """Write ``fig`` (a matplotlib ``Figure``) to ``path`` atomically and return the path.

    The image goes to a temporary file in the same directory, then ``os.replace`` moves
    it into place, so a reader never sees half a file. The format comes from the suffix.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    path = Path(path)
    fmt = figure_format(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    FigureCanvasAgg(fig)
    with atomic.writing(path, suffix=f".{fmt}") as tmp:
        fig.savefig(tmp, format=fmt, dpi=120, bbox_inches="tight")
    return path


def plot_spectrum(sigma, path, title: str = "Singular-value spectrum", rank: int | None = None) -> Path:
    """Singular values (left axis, log scale) and cumulative energy Σ_{i≤k} σ_i² / Σσ² (right axis).

    Args:
        sigma: ``(p,)`` singular values, any order (sorted descending here).
        path: where to write the figure (.png, .pdf or .svg).
        title: the figure's title.
        rank: if given, a vertical line marks the chosen rank r.
    """
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    s = np.sort(np.asarray(sigma, dtype=np.float64).ravel())[::-1]
    if s.size == 0 or not np.all(np.isfinite(s)) or np.any(s < 0):
        raise LorakitError("plot_spectrum needs at least one finite, non-negative singular value")
    total = float(np.sum(s**2))
    energy = np.cumsum(s**2) / total if total > 0 else np.zeros_like(s)
    k = np.arange(1, s.size + 1)
    if rank is not None and not 1 <= rank <= s.size:
        raise LorakitError(f"rank {rank} is out of range for {s.size} singular values; choose 1 ≤ rank ≤ {s.size}")

    fig = Figure(figsize=(7, 4))
    ax = fig.add_subplot()
    marker = "o" if s.size <= 50 else None
    ax.plot(k, s, marker=marker, color="tab:blue")
    if s[-1] > 0 and s[0] / s[-1] > 100:  # log scale only where the spectrum spans decades
        ax.set_yscale("log")
    else:
        ax.set_ylim(bottom=0)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("index k")
    ax.set_ylabel(r"singular value $\sigma_k$", color="tab:blue")
    ax.grid(True, alpha=0.3)

    twin = ax.twinx()
    twin.plot(k, 100 * energy, marker=marker, color="tab:orange")
    twin.set_ylabel(r"cumulative energy $\sum_{i \leq k} \sigma_i^2 \,/\, \sum_i \sigma_i^2$ (%)", color="tab:orange")
    twin.set_ylim(0, 105)
    if rank is not None:
        ax.axvline(rank, color="gray", linestyle="--")
        twin.annotate(
            f"r = {rank}: {100 * energy[rank - 1]:.1f}%",
            xy=(rank, 100 * energy[rank - 1]),
            xytext=(8, -14),
            textcoords="offset points",
        )
    ax.set_title(title)
    return save_figure(fig, path)


# ---------------------------------------------------------------- rank analyses (lorakit.analysis, sweep)

__all__ += ["plot_amplification", "plot_delta_spectra", "plot_similarity", "plot_sweep"]


def _short(path: str, parts: int = 3) -> str:
    """The last ``parts`` dotted components of a module path, for panel titles."""
    return ".".join(path.split(".")[-parts:])


def _labels(paths) -> list[str]:
    """Module paths without the dotted prefix they all share (``bert.encoder.layer.``), for tick labels."""
    paths = list(paths)
    if len(paths) < 2:
        return [_short(p) for p in paths]
    split = [p.split(".") for p in paths]
    common = 0
    while all(len(parts) > common + 1 and parts[common] == split[0][common] for parts in split):
        common += 1
    return [".".join(parts[common:]) for parts in split]


def plot_similarity(results, path, title: str = "Subspace similarity φ(i, j)", max_panels: int = 12) -> Path:
    """Heatmaps of φ(i, j) (LoRA Figure 3), one panel per module, i down, j across, colour 0..1.

    Args:
        results: :class:`lorakit.analysis.ModuleSimilarity` list (``.path``, ``.phi: (k1, k2)``).
        path: where to write the figure.
        max_panels: draw at most this many modules (the first ones).
    """
    from matplotlib.figure import Figure

    results = list(results)[:max_panels]
    if not results:
        raise LorakitError("plot_similarity needs at least one module's φ")
    cols = 2 if len(results) == 4 else min(3, len(results))
    rows = -(-len(results) // cols)
    k1, k2 = results[0].phi.shape
    aspect = max(0.25, min(1.0, k1 / k2))
    fig = Figure(figsize=(4.4 * cols, (4.0 * aspect + 1.1) * rows + 0.6), layout="constrained")
    axes = fig.subplots(rows, cols, squeeze=False)
    image = None
    for n, (ax, res, label) in enumerate(zip(axes.ravel(), results, _labels(r.path for r in results))):
        phi = np.asarray(res.phi, dtype=np.float64)
        image = ax.imshow(phi, vmin=0.0, vmax=1.0, cmap="viridis", aspect="auto", interpolation="nearest",
                          extent=(0.5, phi.shape[1] + 0.5, phi.shape[0] + 0.5, 0.5))
        ax.set_title(label, fontsize=9)
        if n // cols == rows - 1 or n + cols >= len(results):
            ax.set_xlabel("j (second adapter)")
        if n % cols == 0:
            ax.set_ylabel("i (first adapter)")
    for ax in axes.ravel()[len(results):]:
        ax.set_visible(False)
    fig.colorbar(image, ax=axes, shrink=0.8, label="φ(i, j)")
    fig.suptitle(title)
    return save_figure(fig, path)


def plot_delta_spectra(spectra, path, title: str = "Spectrum of ΔW = W_ft − W", energies=(0.90, 0.95, 0.99)) -> Path:
    """Two panels over modules: σ_k / σ_1 (log scale) and cumulative energy, with the energy levels marked.

    Args:
        spectra: module path -> :class:`lorakit.analysis.DeltaSpectrum` (``.sigma``, ``.energy()``).
        path: where to write the figure.
    """
    from matplotlib.figure import Figure

    spectra = {p: s for p, s in dict(spectra).items() if float(s.sigma[0]) > 0}
    if not spectra:
        raise LorakitError("plot_delta_spectra needs at least one module whose ΔW is not zero")
    kinds = sorted({_short(p, 1) for p in spectra})
    colors = {kind: f"C{i % 10}" for i, kind in enumerate(kinds)}
    fig = Figure(figsize=(12, 4.5))
    left, right = fig.subplots(1, 2)
    labelled = set()
    for p, s in spectra.items():
        kind = _short(p, 1)
        sigma = np.asarray(s.sigma, dtype=np.float64)
        k = np.arange(1, sigma.size + 1)
        label = kind if kind not in labelled else None
        labelled.add(kind)
        left.plot(k, sigma / sigma[0], color=colors[kind], alpha=0.5, lw=1, label=label)
        right.plot(k, 100 * np.asarray(s.energy(), dtype=np.float64), color=colors[kind], alpha=0.5, lw=1)
    left.set_yscale("log")
    left.set_xlabel("index k")
    left.set_ylabel("σ_k / σ_1")
    left.grid(True, alpha=0.3)
    left.legend(title="module", fontsize=8)
    for e in energies:
        right.axhline(100 * e, color="gray", linestyle="--", lw=0.8)
        right.annotate(f"{100 * e:g}%", xy=(1, 100 * e), xytext=(2, 2), textcoords="offset points", fontsize=8)
    right.set_xscale("log")
    right.set_xlabel("rank r (log)")
    right.set_ylabel("share of Σσ² in the top r (%)")
    right.set_ylim(0, 102)
    right.grid(True, alpha=0.3)
    fig.suptitle(title)
    return save_figure(fig, path)


def plot_amplification(results, path, title: str = "Projection of W onto r-dim subspaces (LoRA Table 7)") -> Path:
    """Per module: ‖UᵀWV‖_F along ΔW's, W's own and random directions beside ‖ΔW‖_F (log), and the factor.

    Args:
        results: module path -> :class:`lorakit.analysis.Amplification`.
        path: where to write the figure.
    """
    from matplotlib.figure import Figure

    results = dict(results)
    if not results:
        raise LorakitError("plot_amplification needs at least one module")
    names = _labels(results)
    x = np.arange(len(names))
    series = [("‖ΔW‖_F", "delta_norm", "tab:red"), ("W along ΔW's top-r", "along_delta", "tab:blue"),
              ("W along its own top-r", "along_weight", "tab:green"), ("W along random", "along_random", "tab:gray")]
    fig = Figure(figsize=(max(8, 0.45 * len(names) + 3), 7))
    top, bottom = fig.subplots(2, 1, sharex=True)
    width = 0.8 / len(series)
    for i, (label, attr, color) in enumerate(series):
        values = [max(getattr(a, attr), 1e-12) for a in results.values()]
        top.bar(x + (i - 1.5) * width, values, width, label=label, color=color)
    top.set_yscale("log")
    highest = max(max(a.delta_norm, a.along_weight) for a in results.values())
    top.set_ylim(top=highest * 8)  # room for the legend above the bars
    top.set_ylabel("Frobenius norm")
    top.legend(fontsize=8, ncol=4, loc="upper center")
    top.grid(True, axis="y", alpha=0.3)
    bottom.bar(x, [a.factor for a in results.values()], color="tab:purple")
    bottom.set_ylabel("amplification ‖ΔW‖_F / ‖UᵀWV‖_F")
    bottom.grid(True, axis="y", alpha=0.3)
    bottom.set_xticks(x, names, rotation=70, ha="right", fontsize=7)
    top.set_title(title)
    return save_figure(fig, path)


def plot_sweep(rows, path, metric: str = "validation metric", chosen=None,
               title: str = "Rank sweep: metric against trainable parameters") -> Path:
    """Validation metric against trainable parameters (log x), one line per target set, ranks annotated.

    Args:
        rows: dicts with ``targets``, ``rank``, ``trainable_params`` and ``metric``.
        path: where to write the figure.
        chosen: the row to ring (the smallest configuration within tolerance of the best).
    """
    from matplotlib.figure import Figure

    rows = [r for r in rows if r.get("metric") is not None]
    if not rows:
        raise LorakitError("plot_sweep needs at least one finished configuration")
    fig = Figure(figsize=(7.5, 4.8))
    ax = fig.add_subplot()
    groups: dict[str, list] = {}
    for r in rows:
        groups.setdefault(str(r["targets"]), []).append(r)
    for i, (targets, group) in enumerate(groups.items()):
        group = sorted(group, key=lambda r: r["trainable_params"])
        xs = [r["trainable_params"] for r in group]
        ys = [r["metric"] for r in group]
        ax.plot(xs, ys, marker="o", color=f"C{i % 10}", label=targets)
        for r in group:
            ax.annotate(f"r={r['rank']}", xy=(r["trainable_params"], r["metric"]), xytext=(3, 4 - 11 * i),
                        textcoords="offset points", fontsize=7)
    if chosen is not None:
        ax.scatter([chosen["trainable_params"]], [chosen["metric"]], s=220, facecolors="none",
                   edgecolors="black", linewidths=1.5, label="smallest within tolerance", zorder=5)
    ax.set_xscale("log")
    ax.set_xlabel("trainable parameters (log)")
    ax.set_ylabel(metric)
    ax.grid(True, alpha=0.3)
    ax.legend(title="targets", fontsize=8)
    ax.set_title(title)
    return save_figure(fig, path)


__all__ += ["plot_training_curves"]


def plot_training_curves(lines, path, metric: str = "accuracy", title: str = "Training") -> Path:
    """Training loss per step (left) and the validation metric per evaluation (right).

    Args:
        lines: the records of a ``metrics.jsonl`` (:class:`lorakit.report.MetricsLog`):
            training lines ``{"step", "loss", "lr"}``, evaluation lines
            ``{"step", "split": "validation", "<metric>", "loss"}``.
        metric: the validation number to plot (``"accuracy"``, or ``"loss"`` in nats/token).
    """
    from matplotlib.figure import Figure

    train = [line for line in lines if "split" not in line and "loss" in line]
    evals = [line for line in lines if line.get("split") == "validation" and metric in line]
    fig = Figure(figsize=(10, 3.8))
    left, right = fig.add_subplot(1, 2, 1), fig.add_subplot(1, 2, 2)
    if train:
        steps = np.array([line["step"] for line in train])
        loss = np.array([line["loss"] for line in train], dtype=np.float64)
        left.plot(steps, loss, color="tab:blue", alpha=0.35, linewidth=0.8, label="per step")
        window = max(1, len(loss) // 25)
        if window > 1:
            smooth = np.convolve(loss, np.ones(window) / window, mode="valid")
            left.plot(steps[window - 1:], smooth, color="tab:blue", label=f"mean of {window}")
        left.legend(fontsize=8)
    left.set_xlabel("optimizer step")
    left.set_ylabel("training loss (nats)")
    left.grid(True, alpha=0.3)
    if evals:
        right.plot([line["step"] for line in evals], [line[metric] for line in evals], marker="o", color="tab:orange")
    right.set_xlabel("optimizer step")
    right.set_ylabel(f"validation {metric}")
    right.grid(True, alpha=0.3)
    fig.suptitle(title)
    return save_figure(fig, path)


__all__ += ["plot_confusion_matrix", "plot_predictions"]


def plot_confusion_matrix(matrix, labels, path, title: str = "Confusion matrix") -> Path:
    """A confusion matrix as a heat map with its counts written in the cells.

    Args:
        matrix: ``(k, k)`` counts, ``matrix[i][j]`` = examples of class ``i`` answered ``j``
            (rows: truth, columns: answer), as :func:`sklearn.metrics.confusion_matrix`.
        labels: the ``k`` class names.
        path: where to write the figure (.png, .pdf or .svg).
    """
    from matplotlib.figure import Figure

    counts = np.asarray(matrix, dtype=np.int64)
    k = len(labels)
    if counts.shape != (k, k):
        raise LorakitError(f"a confusion matrix for {k} labels must be {k}x{k}, got shape {counts.shape}")
    # each row as a share of its class, so a rare class's errors show as plainly as a common one's
    shares = counts / np.maximum(counts.sum(axis=1, keepdims=True), 1)
    size = min(12.0, 2.5 + 0.6 * k)
    fig = Figure(figsize=(size + 1, size))
    ax = fig.add_subplot(1, 1, 1)
    image = ax.imshow(shares, cmap="Blues", vmin=0, vmax=1)
    fig.colorbar(image, ax=ax, label="share of the true class")
    if k <= 30:
        for i in range(k):
            for j in range(k):
                ax.text(j, i, str(counts[i, j]), ha="center", va="center", fontsize=8,
                        color="white" if shares[i, j] > 0.5 else "black")
    ax.set_xticks(range(k), [str(name) for name in labels], rotation=45, ha="right")
    ax.set_yticks(range(k), [str(name) for name in labels])
    ax.set_xlabel("answer")
    ax.set_ylabel("truth")
    ax.set_title(title)
    return save_figure(fig, path)


def plot_predictions(target, predicted, path, title: str = "Predictions") -> Path:
    """A regression's answers against the truth, one point per example, with the line where they are equal
    and the mean of the truth (what always answering it would give).

    Args:
        target, predicted: ``(n,)`` numbers.
        path: where to write the figure (.png, .pdf or .svg).
    """
    from matplotlib.figure import Figure

    target, predicted = np.asarray(target, dtype=np.float64), np.asarray(predicted, dtype=np.float64)
    if target.shape != predicted.shape or target.ndim != 1:
        raise LorakitError(f"targets and answers must be two (n,) arrays, got {target.shape} and {predicted.shape}")
    fig = Figure(figsize=(6, 6))
    ax = fig.add_subplot(1, 1, 1)
    ax.scatter(target, predicted, s=8, alpha=min(1.0, max(0.15, 300 / max(len(target), 1))), linewidths=0)
    both = np.concatenate([target, predicted]) if len(target) else np.zeros(1)
    low, high = float(both.min()), float(both.max())
    ax.plot([low, high], [low, high], color="black", linewidth=1, label="answer = truth")
    if len(target):
        ax.axhline(float(target.mean()), color="grey", linestyle="--", linewidth=1, label="the truth's mean")
    ax.set_xlabel("truth")
    ax.set_ylabel("answer")
    ax.set_title(title)
    ax.legend(loc="upper left")
    return save_figure(fig, path)
