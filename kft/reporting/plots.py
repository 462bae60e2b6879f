"""PNG figures: training curves and the confusion matrix of a run, the benchmark's bar chart."""

from __future__ import annotations

import io

import matplotlib

matplotlib.use("Agg")  # files only; never needs a display
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402


def _save(fig, path: str) -> None:
    """PNG through tf.io.gfile, so a gs:// model_dir works like a local one."""
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=100)
    plt.close(fig)
    with tf.io.gfile.GFile(path, "wb") as f:
        f.write(buffer.getvalue())


def training_curves(steps: list[int], losses: list[float], epochs: list[dict], path: str) -> None:
    """Train loss per window of steps, and train / eval accuracy per epoch."""
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 4))
    ax1.plot(steps, losses, label="train loss (mean over each logged window)")
    ax1.set_xlabel("step")
    ax1.set_ylabel("loss")
    ax1.legend()
    if epochs:
        x = [e["step"] for e in epochs]
        for key, style, label in (("val_accuracy", "o-", "eval accuracy"),
                                  ("accuracy", "s--", "train accuracy (epoch mean)")):
            if key in epochs[0]:
                ax2.plot(x, [e[key] for e in epochs], style, label=label)
        ax2.set_xlabel("step")
        ax2.set_ylabel("accuracy")
        ax2.legend()
    ax2.set_title("per epoch")
    fig.tight_layout()
    _save(fig, path)


def confusion_matrix(cm: list[list[int]], names: list[str], path: str, title: str = "") -> None:
    cm = np.asarray(cm)
    size = max(4, 0.6 * len(names) + 2)
    fig, ax = plt.subplots(figsize=(size + 1, size))
    im = ax.imshow(cm, cmap="Blues")
    ax.set_xticks(range(len(names)), names, rotation=45, ha="right")
    ax.set_yticks(range(len(names)), names)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(title or "confusion matrix")
    threshold = cm.max() / 2 if cm.size else 0
    for i in range(cm.shape[0]):
        for j in range(cm.shape[1]):
            ax.text(j, i, str(cm[i, j]), ha="center", va="center",
                    color="white" if cm[i, j] > threshold else "black")
    fig.colorbar(im, ax=ax)
    fig.tight_layout()
    _save(fig, path)


def benchmark_bars(labels: list[str], panels: list[tuple[str, list]], implied: list[bool], path: str,
                   title: str = "") -> None:
    """One horizontal bar panel per measure; bars of rows with implied (subset) numbers hatched."""
    fig, axes = plt.subplots(1, len(panels), figsize=(3.4 * len(panels) + 2.5, 0.8 * len(labels) + 1.6))
    for i, (ax, (name, values)) in enumerate(zip(np.atleast_1d(axes), panels)):
        y = np.arange(len(labels))
        heights = [v if v is not None else 0.0 for v in values]
        bars = ax.barh(y, heights, color=[f"C{i}" for i in range(len(labels))])
        for bar, value, hatch in zip(bars, values, implied):
            if hatch:
                bar.set_hatch("//")
            ax.text(bar.get_width(), bar.get_y() + bar.get_height() / 2,
                    " n/a" if value is None else f" {value:,.3g}", va="center")
        ax.set_yticks(y, labels if i == 0 else [])
        ax.invert_yaxis()
        ax.set_title(name)
        ax.margins(x=0.25)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    _save(fig, path)


def per_type_scores(per_type: dict, path: str, title: str = "") -> None:
    """Grouped bars of precision, recall and F1 per entity type."""
    kinds = sorted(per_type)
    fig, ax = plt.subplots(figsize=(max(4.0, 1.2 * len(kinds) + 1.5), 3.6))
    x = np.arange(len(kinds))
    for i, measure in enumerate(("precision", "recall", "f1")):
        ax.bar(x + (i - 1) * 0.27, [per_type[k][measure] for k in kinds], width=0.27, label=measure)
    ax.set_xticks(x, [f"{k}\n({per_type[k]['support']})" for k in kinds])
    ax.set_ylim(0, 1)
    ax.set_ylabel("score")
    ax.set_title(title or "entity scores per type (support)")
    ax.legend(loc="lower right")
    fig.tight_layout()
    _save(fig, path)


def f1_by_context_length(rows: list[dict], path: str, title: str = "") -> None:
    """Bars of F1 and exact match per context-length bin (question answering)."""
    fig, ax = plt.subplots(figsize=(max(4.0, 1.1 * len(rows) + 1.5), 3.6))
    x = np.arange(len(rows))
    ax.bar(x - 0.2, [r["f1"] for r in rows], width=0.4, label="F1")
    ax.bar(x + 0.2, [r["exact_match"] for r in rows], width=0.4, label="exact match")
    ax.set_xticks(x, [f"{r['words_from']}-{r['words_to']}\n({r['questions']})" for r in rows])
    ax.set_ylim(0, 100)
    ax.set_xlabel("context length in words (questions)")
    ax.set_ylabel("score")
    ax.set_title(title or "F1 by context length")
    ax.legend(loc="upper right")
    fig.tight_layout()
    _save(fig, path)


def drift(drift_section: dict, path: str, title: str = "") -> None:
    """Per transformer layer: relative weight distance from the start, and linear CKA between the
    starting and the fine-tuned representations of the general-text sample; for a decoder, a third
    panel with its perplexity on that sample before and after."""
    weights = drift_section["weights"]["per_layer"]
    cka = (drift_section.get("representations") or {}).get("per_layer")
    perplexity = drift_section.get("perplexity")
    if perplexity:
        fig, (ax1, ax2, ax3) = plt.subplots(1, 3, figsize=(13, 4), gridspec_kw={"width_ratios": [2, 2, 1]})
    else:
        fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 4))
    layers = np.arange(1, len(weights) + 1)
    ax1.bar(layers, weights, color="tab:red")
    ax1.set_xlabel("transformer layer")
    ax1.set_ylabel("||theta - theta_0|| / ||theta_0||")
    ax1.set_title(f"weight distance (overall {drift_section['weights']['overall']:.4f})")
    if cka:
        ax2.plot(layers, cka, marker="o")
        ax2.set_ylim(min(0.0, min(cka)) , 1.05)
        ax2.set_title("linear CKA, start vs fine-tuned (general text)")
    ax2.set_xlabel("transformer layer")
    ax2.set_ylabel("linear CKA")
    if perplexity:
        values = [perplexity["before"], perplexity["after"]]
        bars = ax3.bar(["start", "fine-tuned"], values, color=["tab:gray", "tab:blue"])
        for bar, value in zip(bars, values):
            ax3.text(bar.get_x() + bar.get_width() / 2, bar.get_height(), f"{value:,.4g}", ha="center",
                     va="bottom")
        ax3.margins(y=0.15)
        ax3.set_ylabel("perplexity")
        ax3.set_title(f"perplexity, general text\n({100 * perplexity['relative_change']:+.1f}%)")
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    _save(fig, path)
