"""Attributions of a run's texts, computed by the run's task and written for people: an HTML page
and a PNG, each word shaded by its attribution (red toward the explained output, blue against,
stronger = larger share of the text's largest), and JSON lines with the numbers.

A record (kft.explain's JSON line) holds "title" (what is explained, e.g. the predicted label and
its probability) and "words": [{"word", "attribution"}, ...]; the page shows one record per block.
A decoder's record also holds "completion" (the generated text), shown under the prompt's words.
"""

from __future__ import annotations

import html
import json
import os
import textwrap

RED, BLUE = (214, 39, 40), (31, 119, 180)
EXPLAINABLE = ("classification", "token_classification", "causal_lm")


def _rgba(value: float, scale: float) -> tuple[tuple[int, int, int], float]:
    strength = 0.0 if scale <= 0 else min(1.0, abs(value) / scale)
    return (RED if value >= 0 else BLUE), round(0.85 * strength, 3)


def page(records: list[dict], heading: str) -> str:
    blocks = []
    for r in records:
        scale = max([abs(w["attribution"]) for w in r["words"]] + [0.0])
        spans = []
        for w in r["words"]:
            (cr, cg, cb), alpha = _rgba(w["attribution"], scale)
            spans.append(f'<span class="w" style="background: rgba({cr},{cg},{cb},{alpha})" '
                         f'title="{w["attribution"]:+.4f}">{html.escape(w["word"])}</span>')
        note = html.escape(r.get("note", ""))
        completion = ""
        if "completion" in r:
            completion = ('<div class="completion" style="white-space: pre-wrap; font-family: monospace; '
                          f'margin: 0.3em 0">&rarr; {html.escape(r["completion"])}</div>')
        blocks.append(f'<div class="rec"><div class="title">{html.escape(r["title"])}</div>'
                      f'<div class="text">{" ".join(spans)}</div>' + completion
                      + (f'<div class="note">{note}</div>' if note else "") + "</div>")
    legend = ('<div class="legend"><span class="w" style="background: rgba(214,39,40,0.85)">toward</span> '
              'the explained output &nbsp; <span class="w" style="background: rgba(31,119,180,0.85)">against'
              '</span> &nbsp; shade = |attribution| / the text\'s largest; hover a word for its value</div>')
    return f"""<!doctype html>
<html><head><meta charset="utf-8"><title>{html.escape(heading)}</title>
<style>
body {{ font-family: sans-serif; margin: 2em; max-width: 60em; }}
.rec {{ margin: 1.2em 0; }} .title {{ font-weight: bold; margin-bottom: 0.3em; }}
.text {{ line-height: 2; }} .w {{ padding: 0.15em 0.2em; border-radius: 0.2em; }}
.note {{ color: #666; font-size: 0.85em; }} .legend {{ margin-bottom: 1.5em; }}
</style></head><body><h2>{html.escape(heading)}</h2>
{legend}
{chr(10).join(blocks)}
</body></html>
"""


def image(records: list[dict], path: str, heading: str, width: float = 11.0) -> None:
    """The same shading as `page`, drawn with matplotlib (words wrapped to the figure width)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    chars_per_line = int(width * 11)
    lines = [("legend", None), ("gap", None)]  # (kind, content)
    for r in records:
        lines.append(("title", r["title"]))
        current, used = [], 0
        for w in r["words"]:
            if used + len(w["word"]) + 1 > chars_per_line and current:
                lines.append(("words", (current, r)))
                current, used = [], 0
            current.append(w)
            used += len(w["word"]) + 1
        lines.append(("words", (current, r)))
        if "completion" in r:
            wrapped = textwrap.wrap("\u2192 " + " ".join(r["completion"].split()), chars_per_line) or ["\u2192"]
            lines += [("completion", line) for line in wrapped]
        lines.append(("gap", None))
    height = 0.6 + 0.32 * len(lines)
    fig = plt.figure(figsize=(width, height))
    fig.text(0.01, 1 - 0.25 / height, heading, fontsize=12, weight="bold", va="top")
    renderer = fig.canvas.get_renderer()
    y = 1 - 0.6 / height
    for kind, content in lines:
        if kind == "legend":
            x = 0.01
            for label, colour in (("toward", RED), ("against", BLUE)):
                t = fig.text(x, y, label, fontsize=9, va="center",
                             bbox={"facecolor": tuple(c / 255 for c in colour) + (0.85,), "edgecolor": "none",
                                   "pad": 1.5})
                x += t.get_window_extent(renderer).width / fig.bbox.width + 0.01
            fig.text(x, y, "the explained output; shade = |attribution| / the text's largest", fontsize=9,
                     va="center")
        elif kind == "title":
            fig.text(0.01, y, content, fontsize=10, weight="bold", va="center")
        elif kind == "completion":
            fig.text(0.01, y, content, fontsize=10, family="DejaVu Sans Mono", va="center")
        elif kind == "words":
            words, r = content
            scale = max([abs(w["attribution"]) for w in r["words"]] + [0.0])
            x = 0.01
            for w in words:
                (cr, cg, cb), alpha = _rgba(w["attribution"], scale)
                t = fig.text(x, y, w["word"], fontsize=10, va="center", family="DejaVu Sans",
                             bbox={"facecolor": (cr / 255, cg / 255, cb / 255, alpha), "edgecolor": "none",
                                   "pad": 1.5})
                x += t.get_window_extent(renderer).width / fig.bbox.width + 0.006
        y -= 0.32 / height
    fig.savefig(path, dpi=110)
    plt.close(fig)


def explain(run, texts: list[str], steps: int, target: str = "", max_steps: int | None = None) -> list[dict]:
    """The run's task's records; `max_steps`: where a text's completeness gap is above 1%, its
    intervals are halved up to this many (None: `steps` only)."""
    if run.config.task == "classification":
        from kft.tasks.classification import explain as task_explain
    elif run.config.task == "token_classification":
        from kft.tasks.token_classification import explain as task_explain
    elif run.config.task == "causal_lm":
        from kft.tasks.causal_lm import explain as task_explain
    else:
        from kft.config import FlagError

        raise FlagError(f"--model_dir={run.path}: kft.explain covers --task={', '.join(EXPLAINABLE)}; "
                        f"this run is --task={run.config.task}")
    return task_explain.explain(run, texts, steps, target, max_steps)


def write(records: list[dict], output_dir: str, heading: str) -> dict:
    import tensorflow as tf

    tf.io.gfile.makedirs(output_dir)
    paths = {k: os.path.join(output_dir, f"attributions.{k}") for k in ("jsonl", "html", "png")}
    with tf.io.gfile.GFile(paths["jsonl"], "w") as f:
        f.write("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records))
    with tf.io.gfile.GFile(paths["html"], "w") as f:
        f.write(page(records, heading))
    image(records, paths["png"], heading)
    return paths
