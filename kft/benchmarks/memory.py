"""`python -m kft.bench --mode=memory`: peak memory and step time of decoder LoRA by model size, and
a projection of both to a Llama-3-8B shape.

For each size (random-weight Hugging Face llama folders with SmolLM2's published shapes, bfloat16
like the released checkpoints: the values change neither memory nor time) and each combination of
frozen-base storage (float32, int8, int4), attention kernel (standard, memory-efficient) and
gradient checkpointing, a fresh process runs a few LoRA steps of kft's training step on DialogSum
batches of one fixed shape; the Hugging Face Trainer + PEFT runs on the same batches (float32,
SDPA attention, with and without its gradient checkpointing). Each process records its peak
resident memory while loading and while training, the memory it holds once ready, and the time
of each step after the first (traced) one.

From the rows, per combination, least squares fits
    loading peak          = a_L + b_L * float32 bytes of all parameters
    ready (weights held)  = a_R + b_R * bytes of the weights as held (int8/int4 projections, float rest)
    training increment    = a_T + c * batch*tokens*layers*hidden + d * batch*heads*tokens^2*layers_kept
(layers_kept = 1 with checkpointing; the tokens^2 term only where scores are stored: standard and
SDPA attention), after removing the logits (positions projected x vocabulary, float32, LOGIT_COPIES
copies: every measured model has SmolLM2's vocabulary, so their share cannot be fitted). The
projection is max(loading, ready + increment) for the target shape, against 24 and 80 GiB.

This module is the mode (flags, the runs, the report); memory_models.py holds the shapes,
combinations and folder writer, memory_rows.py the measured processes, memory_fit.py the fits.
"""

import dataclasses
import json
import os
import subprocess
import sys
import time

from kft.benchmarks.memory_fit import ACCELERATORS, GIB, LOGIT_COPIES, MODELS, features, projections
from kft.benchmarks.memory_models import (SIZES, TARGET, TARGET_NAME, Combo, parse_combo, parse_combos,
                                         write_llama_folder)
from kft.benchmarks.memory_rows import dialogsum_rows, hf_row, kft_row, load_rows, save_rows

DEFAULT_COMBOS = ["float-standard", "float-standard-ckpt", "float-efficient", "float-efficient-ckpt",
                  "int8-efficient-ckpt", "int4-efficient", "int4-efficient-ckpt", "hf-sdpa", "hf-sdpa-ckpt"]


def parse_sizes(names: list[str]) -> list[str]:
    from kft.config import FlagError

    unknown = [n for n in names if n not in SIZES]
    if unknown or not names:
        raise FlagError(f"--memory_sizes: unknown {unknown or 'none'}; choose from {', '.join(SIZES)}")
    return list(names)


def parse_shape(text: str) -> tuple[int, int]:
    """'2x512' -> (batch 2, 512 tokens)."""
    from kft.config import FlagError

    try:
        batch, tokens = (int(x) for x in text.lower().split("x"))
    except ValueError:
        raise FlagError(f"shape '{text}': write <batch>x<tokens>, e.g. 1x1024") from None
    if batch < 1 or tokens < 2:
        raise FlagError(f"shape '{text}': batch and tokens must be positive (tokens at least 2)")
    return batch, tokens


# -- flags, the runs and the report ------------------------------------------------------------------

def define_flags(flag_values) -> None:
    """The memory mode's flags (kft.bench defines them beside its own)."""
    from absl import flags

    fv = flag_values
    flags.DEFINE_list("memory_sizes", list(SIZES), f"--mode=memory: model sizes, of {', '.join(SIZES)} "
                      "(random-weight llama folders with SmolLM2's shapes).", flag_values=fv)
    flags.DEFINE_list("memory_combos", DEFAULT_COMBOS, "--mode=memory: combinations to measure: "
                      "<float|int8|int4>-<standard|efficient>[-ckpt] (kft's --base_quantization, --attention, "
                      "--gradient_checkpointing) or hf-sdpa[-ckpt] (the Hugging Face Trainer + PEFT).",
                      flag_values=fv)
    flags.DEFINE_integer("memory_steps", 3, "--mode=memory: LoRA steps per row; the first (traced) one is not "
                         "timed.", flag_values=fv)
    flags.DEFINE_string("memory_probe_shape", "1x1024", "--mode=memory: a second <batch>x<tokens> with the "
                        "same tokens per step but longer rows, run on the first size only: it separates the "
                        "per-token and per-token-squared memory terms; empty = none.", flag_values=fv)
    flags.DEFINE_string("memory_target_shape", "1x2048", "--mode=memory: the <batch>x<tokens> the "
                        f"{TARGET_NAME} projection is for.", flag_values=fv)
    flags.DEFINE_string("memory_models_dir", "~/.cache/kft/memory_models", "--mode=memory: where the "
                        "random-weight folders are written (once per size).", flag_values=fv)
    flags.DEFINE_string("memory_rows_file", "", "--mode=row with a memory row: the fixed rows (internal).",
                        flag_values=fv)


@dataclasses.dataclass
class Options:
    sizes: list
    combos: list
    steps: int
    shape: tuple  # (batch, tokens) of every size
    probe: tuple | None  # (batch, tokens) run on the first size only
    target: tuple  # (batch, tokens) of the projection
    models_dir: str
    bench_dir: str
    argv: list  # the command line, handed on to each row's process


def options_from_flags(flag_values, config) -> Options:
    """The memory mode's options; a FlagError names a refused flag."""
    from kft.config import FlagError

    if flag_values.memory_steps < 2:
        raise FlagError(f"--memory_steps={flag_values.memory_steps}: at least 2 (the first step is traced, "
                        "not timed)")
    if config.task != "causal_lm" or config.method != "lora":
        raise FlagError("--mode=memory measures --task=causal_lm --method=lora (flags/bench_memory.cfg)")
    if not config.batch_size or not config.sequence_length:
        raise FlagError("--mode=memory: give the fixed shape as --batch_size and --sequence_length")
    probe = parse_shape(flag_values.memory_probe_shape) if flag_values.memory_probe_shape else None
    passed = [a for a in sys.argv[1:] if not a.startswith(("--mode=", "--row=", "--row_output="))]
    return Options(parse_sizes(list(flag_values.memory_sizes)), parse_combos(list(flag_values.memory_combos)),
                   flag_values.memory_steps, (config.batch_size, config.sequence_length), probe,
                   parse_shape(flag_values.memory_target_shape), os.path.expanduser(flag_values.memory_models_dir),
                   os.path.abspath(flag_values.bench_dir), passed)


def run_child(config, flag_values) -> dict:
    """One row in this process (--mode=row --row=memory_kft|memory_hf)."""
    combo = parse_combo(flag_values.memory_combos[0])
    rows = load_rows(flag_values.memory_rows_file)
    steps = flag_values.memory_steps
    if flag_values.row == "memory_hf":
        return hf_row(config, combo, config.backbone, rows, steps)
    return kft_row(config, combo, rows, steps)


def _run_row(options: Options, size: str, folder: str, combo: Combo, shape: tuple, rows_file: str) -> dict:
    """One row in a fresh interpreter; a failure becomes a row that says so."""
    tag = f"{size}_{combo.name}_{shape[0]}x{shape[1]}"
    out, log = (os.path.join(options.bench_dir, "memory_rows", f"{tag}.{ext}") for ext in ("json", "log"))
    cmd = [sys.executable, "-m", "kft.bench", *options.argv, "--mode=row",
           f"--row=memory_{combo.framework}", f"--row_output={out}", f"--backbone={folder}",
           f"--memory_combos={combo.name}", f"--memory_rows_file={rows_file}", f"--batch_size={shape[0]}",
           f"--sequence_length={shape[1]}", f"--memory_steps={options.steps}",
           *(combo.kft_flags() if combo.framework == "kft" else [])]
    print(f"[memory] {tag}: running (log: {log})", flush=True)
    t0 = time.time()
    with open(log, "w") as f:
        status = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT).returncode
    meta = {"size": size, "combo": combo.name, "framework": combo.framework, "batch": shape[0],
            "tokens": shape[1], "wall_seconds": round(time.time() - t0, 1), "log": log,
            "parameters": SIZES[size].parameters()}
    if status != 0 or not os.path.exists(out):
        with open(log) as f:
            lines = [line.strip() for line in f if line.strip()]
        print(f"[memory] {tag}: FAILED (exit status {status})", flush=True)
        killed = " (killed: out of memory?)" if status in (-9, 137) else ""
        return {**meta, "status": "failed", "note": f"exit status {status}{killed}: {lines[-1] if lines else ''}"}
    with open(out) as f:
        result = json.load(f)
    print(f"[memory] {tag}: peak {result['memory']['peak'] / GIB:.2f} GiB, {result['seconds_per_step']:.2f} s/step "
          f"in {meta['wall_seconds']:.0f} s", flush=True)
    return {**meta, **result, "status": "ok"}


def _plan(options: Options) -> list[tuple[str, tuple]]:
    """(size, shape) pairs in run order: every size at the shape, the first size also at the probe."""
    plan = [(size, options.shape) for size in options.sizes]
    if options.probe and options.probe != options.shape:
        plan.insert(1, (options.sizes[0], options.probe))
    return plan


def run(config, options: Options) -> dict:
    """Writes the folders, builds the rows once per shape, runs every row, fits and projects; writes
    bench_memory.json (after every row, so a stopped run keeps its rows) and bench_memory.md."""
    from kft.models import backbones

    os.makedirs(os.path.join(options.bench_dir, "memory_rows"), exist_ok=True)
    tokenizer_folder = backbones.resolve_decoder("", config.cache_dir)[0]  # the bundled SmolLM2, converted
    report = {"options": {k: v for k, v in dataclasses.asdict(options).items() if k != "combos"},
              "combos": [c.name for c in options.combos], "target": {"name": TARGET_NAME,
                                                                     **dataclasses.asdict(TARGET)},
              "sizes": {s: dataclasses.asdict(SIZES[s]) for s in options.sizes}, "rows": []}
    folders, rows_files = {}, {}
    for size, shape in _plan(options):
        if size not in folders:
            t0 = time.time()
            folders[size] = write_llama_folder(os.path.join(options.models_dir, f"smollm2_{size}_random_bf16"),
                                               SIZES[size], tokenizer_folder)
            print(f"[memory] {size}: folder {folders[size]} ready in {time.time() - t0:.0f} s", flush=True)
        if shape not in rows_files:
            rows = dialogsum_rows(config, folders[options.sizes[0]], shape[0], shape[1], options.steps)
            rows_files[shape] = save_rows(rows, os.path.join(options.bench_dir, f"rows_{shape[0]}x{shape[1]}.npz"))
        for combo in options.combos:
            missing = combo.framework == "hf" and _hf_missing()
            row = {"size": size, "combo": combo.name, "framework": "hf", "batch": shape[0], "tokens": shape[1],
                   "status": "not run", "note": f"{missing} is not installed (pip install -e '.[bench]')"} \
                if missing else _run_row(options, size, folders[size], combo, shape, rows_files[shape])
            if row["status"] == "ok":
                row["features"] = features(SIZES[size], combo, shape[0], shape[1], row["projected_positions"],
                                           config.lora_rank)
            report["rows"].append(row)
            write_json(report, options.bench_dir)
    report["projection"] = projections(report["rows"], options.combos, *options.target, config.lora_rank)
    write_json(report, options.bench_dir)
    with open(os.path.join(options.bench_dir, "bench_memory.md"), "w") as f:
        f.write(markdown(report) + "\n")
    return report


def _hf_missing() -> str:
    """What the Trainer rows lack ('' when nothing)."""
    import importlib.util

    return ", ".join(m for m in ("torch", "transformers", "accelerate", "peft") if importlib.util.find_spec(m) is None)


def write_json(report: dict, bench_dir: str) -> None:
    with open(os.path.join(bench_dir, "bench_memory.json"), "w") as f:
        json.dump(report, f, indent=2, default=str)


def _gib(value) -> str:
    return "n/a" if value is None else f"{value / GIB:.2f}"


def markdown(report: dict) -> str:
    """The measured rows, then the labelled projection, as markdown tables."""
    out = ["## Measured: LoRA steps on DialogSum rows of one fixed shape (peak resident memory, GiB)", "",
           "| size | combination | batch x tokens | load peak | ready | train peak | peak | s/step | real tok/s |",
           "|---|---|---|---|---|---|---|---|---|"]
    for r in report["rows"]:
        if r["status"] != "ok":
            out.append(f"| {r['size']} | {r['combo']} | {r['batch']}x{r['tokens']} | {r['status']}: {r['note']} |||||||")
            continue
        m = r["memory"]
        out.append(f"| {r['size']} | {r['combo']} | {r['batch']}x{r['tokens']} | {_gib(m['load_peak'])} | "
                   f"{_gib(m['ready_rss'])} | {_gib(m['train_peak'])} | {_gib(m['peak'])} | {r['seconds_per_step']:.2f} "
                   f"| {r['real_tokens_per_second']:.0f} |")
    target = report["target"]
    batch, tokens = report["options"]["target"]
    out += ["", f"## PROJECTION (extrapolated from the fits, not measured): {target['name']} (hidden "
            f"{target['hidden']}, {target['layers']} layers, {target['heads']} heads, {target['kv_heads']} kv heads, "
            f"MLP {target['intermediate']}, vocabulary {target['vocab']}), LoRA at batch {batch} x {tokens} tokens",
            "", "| combination | load peak GiB | ready GiB | training GiB | peak GiB | less process constant GiB | "
            + " | ".join(f"fits {k}" for k in ACCELERATORS) + " | fit residual GiB (load / ready / training) |",
            "|---|---|---|---|---|---|" + "---|" * len(ACCELERATORS) + "---|"]
    for name, p in report.get("projection", {}).items():
        if p["status"] != "ok":
            out.append(f"| {name} | {p['status']} |")
            continue
        residuals = " / ".join(_gib(p["fits"][k]["residual_rms"]) + ("*" if p["fits"][k]["exact"] else "")
                               for k in MODELS)
        out.append(f"| {name} | {_gib(p['load_peak'])} | {_gib(p['ready'])} | {_gib(p['training'])} | {_gib(p['peak'])} "
                   f"| {_gib(p['device_estimate'])} | " + " | ".join("yes" if p["within"][k] else "no"
                                                                     for k in ACCELERATORS) + f" | {residuals} |")
    out += ["", "Measured on this machine's CPU: the resident memory of the whole process, loading included; an "
            "accelerator holds the same weights, activations and optimizer state, but its allocator and kernels "
            "differ, so read the projection as an estimate.", "",
            "Peak = max(load peak, ready + training). 'Less process constant' drops the fitted intercept of "
            "the ready memory (interpreter and libraries, host memory on an accelerator) and is what the "
            "accelerator columns compare (GiB). Logits: " f"{LOGIT_COPIES} float32 copies of [projected positions x "
            "vocabulary], arithmetic, not fitted (every measured model has one vocabulary). * = as many rows as "
            "terms: an exact fit, no residual to judge it by. Terms a fit could not determine: "
            + _dropped_terms(report.get("projection", {}))]
    return "\n".join(out)


def _dropped_terms(projection: dict) -> str:
    named = [f"{name}: {', '.join(sorted({d for f in p['fits'].values() for d in f['dropped']}))}"
             for name, p in projection.items()
             if p.get("status") == "ok" and any(f["dropped"] for f in p["fits"].values())]
    return "; ".join(named) or "none"


def main(flag_values, started: float) -> int:
    """`--mode=memory` (the whole measurement) or one of its rows (`--mode=row --row=memory_*`)."""
    from absl import app

    from kft import config as config_lib, startup

    if flag_values.row != "memory_hf":  # the Trainer's process holds no TensorFlow
        startup.import_tensorflow()
    config = config_lib.from_flags(flag_values)
    if flag_values.mode == "row":
        result = run_child(config, flag_values)
        with open(flag_values.row_output, "w") as f:
            json.dump(result, f, indent=2, default=str)
        return 0
    try:
        options = options_from_flags(flag_values, config)
    except config_lib.FlagError as e:
        raise app.UsageError(str(e)) from None
    report = run(config, options)
    print(markdown(report))
    print(f"\nwrote {os.path.join(options.bench_dir, 'bench_memory.json')} and bench_memory.md "
          f"({time.time() - started:.0f} s)")
    return 0
