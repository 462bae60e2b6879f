"""The compression table: `python -m kft.bench --mode=compress` runs it end to end.

For each data set (SST-2, CoNLL-2003) it trains the recipes under flags/compress/ in order, each in
a fresh `python -m kft.train` process from an empty model folder: the 6-layer teacher (exported in
float32 and int8), a 3-layer student trained alone, the same student distilled, 3 pretrained
layers without a teacher, and the 6-layer model pruned to 50%. Every export is then served by
`kft.bench --mode=serve` in a fresh process (batch 1 p50/p99, batch 64 throughput). The table goes
to <bench_dir>/compress.json and compress.md and is printed.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time

RECIPES = {
    "sst2": ["teacher", "student_alone", "student_distilled", "student_pretrained", "pruned"],
    "conll2003": ["teacher", "student_alone", "student_distilled", "student_pretrained", "pruned"],
}
LABELS = {
    "teacher": "6 layers, float32", "teacher_int8": "6 layers, int8 weights",
    "student_alone": "3 layers from the teacher, trained alone",
    "student_distilled": "3 layers from the teacher, distilled",
    "student_pretrained": "3 pretrained layers, no teacher",
    "pruned": "6 layers, 50% magnitude-pruned",
}


def _flag(path: str, name: str) -> str:
    with open(path) as f:
        for line in f:
            if line.startswith(f"--{name}="):
                return line.strip().split("=", 1)[1]
    raise ValueError(f"{path}: no --{name}")


def folder_bytes(path: str) -> int:
    return sum(os.path.getsize(os.path.join(d, n)) for d, _, names in os.walk(path) for n in names)


def _run(cmd: list[str], log: str) -> float:
    print(f"[compress] {' '.join(cmd[2:])}  (log: {log})", flush=True)
    t0 = time.time()
    with open(log, "w") as f:
        status = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT).returncode
    if status != 0:
        with open(log) as f:
            tail = [line.strip() for line in f if line.strip()][-1:]
        raise RuntimeError(f"{' '.join(cmd[2:])} failed with exit status {status}: {tail} (see {log})")
    return time.time() - t0


def _serve(flagfile: str, export: str, out_dir: str) -> dict:
    os.makedirs(out_dir, exist_ok=True)
    _run([sys.executable, "-m", "kft.bench", f"--flagfile={flagfile}", "--mode=serve",
          f"--saved_model={export}", f"--bench_dir={out_dir}"], os.path.join(out_dir, "serve.log"))
    with open(os.path.join(out_dir, "serve.json")) as f:
        return json.load(f)


def _row(name: str, metrics: dict, export: str, serve: dict, seconds: float, headline: str) -> dict:
    return {
        "row": name, "label": LABELS[name], "layers": metrics["backbone"]["layers"]
        if not metrics.get("student") else metrics["student"]["layers"],
        "parameters": metrics["parameters"]["total"], "export": export,
        "export_bytes": folder_bytes(export), "variables_bytes": folder_bytes(os.path.join(export, "variables")),
        "batch_1_p50_ms": serve["batch_1"]["p50_ms"], "batch_1_p99_ms": serve["batch_1"]["p99_ms"],
        "batch_64_texts_per_second": serve["batch_64"]["texts_per_second"],
        "metric": headline, "run_seconds": round(seconds, 1),
    }


def long_texts(export: str, dev_tsv: str) -> dict:
    """Accuracy on the dev texts longer than the training cap: served whole (the export's default)
    against cut to the training cap, as exports before serving_sequence_length did."""
    import numpy as np
    import tensorflow as tf

    from kft.models import backbones
    from kft.models import savedmodel as export_lib
    from kft.data import inputs

    with open(os.path.join(export, "assets.extra", "metadata.json")) as f:
        meta = json.load(f)
    with open(dev_tsv) as f:
        rows = [line.rstrip("\n").split("\t") for line in f][1:]
    texts, labels = [r[0] for r in rows], np.array([int(r[1]) for r in rows])
    loaded = backbones.load(backbones.bundled_folder())
    cap, serving = meta["sequence_length"], meta["serving_sequence_length"]
    lengths = inputs.encode(loaded.tokenizer, loaded.packing, texts, serving).lengths
    long = np.flatnonzero(lengths > cap)
    model = export_lib.load(export)
    served = model.signatures["serving_default"](text=tf.constant([texts[i] for i in long]))
    cut = inputs.encode(loaded.tokenizer, loaded.packing, [texts[i] for i in long], cap)
    ids = cut.ids.to_tensor(default_value=loaded.packing.pad).numpy()
    mask = (np.arange(ids.shape[1])[None, :] < cut.lengths[:, None]).astype(np.int32)
    capped = model.signatures["serve_token_ids"](token_ids=tf.constant(ids), padding_mask=tf.constant(mask))
    truth = labels[long]
    return {"training_cap": cap, "serving_cap": serving, "long_texts": int(len(long)),
            "of": len(texts), "accuracy_served_whole": float(np.mean(served["class_id"].numpy() == truth)),
            "accuracy_cut_to_training_cap": float(np.mean(capped["class_id"].numpy() == truth))}


def run(sets: list[str], bench_dir: str, flags_dir: str = "flags/compress") -> dict:
    os.makedirs(bench_dir, exist_ok=True)
    report = {"sets": {}}
    for data in sets:
        if data not in RECIPES:
            raise ValueError(f"--compress_sets: unknown {data!r}; choose from {sorted(RECIPES)}")
        rows = []
        for name in RECIPES[data]:
            flagfile = os.path.join(flags_dir, f"{data}_{name}.cfg")
            model_dir, run_name = _flag(flagfile, "model_dir"), _flag(flagfile, "run_name")
            export_root = os.path.join(_flag(flagfile, "export_dir"), run_name)
            for stale in (model_dir, export_root, export_root + "_int8"):
                shutil.rmtree(stale, ignore_errors=True)  # a cold run every time
            seconds = _run([sys.executable, "-m", "kft.train", f"--flagfile={flagfile}"],
                           os.path.join(bench_dir, f"{data}_{name}.log"))
            with open(os.path.join(model_dir, "metrics.json")) as f:
                metrics = json.load(f)
            headline = "accuracy" if metrics["task"] == "classification" else "entity_f1"
            serve = _serve(flagfile, metrics["export"], os.path.join(bench_dir, f"serve_{data}_{name}"))
            rows.append(_row(name, metrics, metrics["export"], serve, seconds, headline)
                        | {"score": metrics["eval"][headline], "sparsity": (metrics.get("pruning") or {}).get("measured")})
            quant = metrics.get("quantization")
            if quant:
                serve = _serve(flagfile, quant["export"], os.path.join(bench_dir, f"serve_{data}_{name}_int8"))
                rows.append(_row("teacher_int8", metrics, quant["export"], serve, 0.0, headline)
                            | {"score": quant["eval"][headline], "sparsity": None})
            if name == "teacher" and metrics["task"] == "classification":
                report.setdefault("long_texts", {})[data] = long_texts(metrics["export"], _flag(flagfile, "eval_file"))
        teacher = rows[0]
        for row in rows:
            row["batch_64_speedup"] = round(row["batch_64_texts_per_second"] / teacher["batch_64_texts_per_second"], 2)
            row["size_vs_float32"] = round(row["export_bytes"] / teacher["export_bytes"], 3)
        report["sets"][data] = rows
    with open(os.path.join(bench_dir, "compress.json"), "w") as f:
        json.dump(report, f, indent=2)
    text = markdown(report)
    with open(os.path.join(bench_dir, "compress.md"), "w") as f:
        f.write(text + "\n")
    return report


def markdown(report: dict) -> str:
    out = []
    for data, rows in report["sets"].items():
        metric = rows[0]["metric"].replace("_", " ")
        out += [f"**{data}** ({metric} on the dev split)", "",
                "| model | parameters | export MB | batch 1 p50 / p99 ms | batch 64 texts/s | "
                f"vs float32 at batch 64 | {metric} |",
                "|---|---:|---:|---:|---:|---:|---:|"]
        for r in rows:
            extra = f" ({100 * r['sparsity']:.1f}% zeros)" if r.get("sparsity") else ""
            out.append(f"| {r['label']}{extra} | {r['parameters'] / 1e6:.1f}M | {r['export_bytes'] / 1e6:.1f} | "
                       f"{r['batch_1_p50_ms']:.1f} / {r['batch_1_p99_ms']:.1f} | "
                       f"{r['batch_64_texts_per_second']:.0f} | {r['batch_64_speedup']:.2f}x | {r['score']:.4f} |")
        out.append("")
    for data, lt in report.get("long_texts", {}).items():
        out.append(f"{data}: {lt['long_texts']} of {lt['of']} dev texts are longer than the training cap of "
                   f"{lt['training_cap']} tokens; accuracy on them served whole (up to {lt['serving_cap']}) "
                   f"{lt['accuracy_served_whole']:.4f}, cut to the training cap {lt['accuracy_cut_to_training_cap']:.4f}.")
    return "\n".join(out)
