"""The memory benchmark's model of peak memory: what each fitted term multiplies, the least-squares
fits of one combination's rows, and the projection to a target shape (see kft/benchmarks/memory.py)."""

from __future__ import annotations

import math

import numpy as np

from kft.benchmarks.memory_models import TARGET, Combo, LlamaShape

GIB = 1 << 30
LOGIT_COPIES = 3  # the logits, their softmax gradient and one temporary, float32
ACCELERATORS = {"24 GiB": 24 * GIB, "80 GiB": 80 * GIB}


def held_bytes(shape: LlamaShape, base: str, lora_rank: int) -> float:
    """Bytes of the weights as a run holds them: projections in float32, int8 (+ a float32 scale per
    output) or int4 (+ one per 128 inputs of each output); embeddings and norms float32; the LoRA
    factors with their gradient and two Adam moments (4 float32 copies)."""
    p = shape.parameters()
    rest = 4.0 * (p["embedding"] + p["norm"])
    per_block = shape.projection_shapes()
    if base == "float":
        projections = 4.0 * p["projection"]
    elif base == "int8":
        projections = p["projection"] + 4.0 * shape.layers * sum(o for _, _, o in per_block)
    elif base == "int4":
        projections = 0.5 * p["projection"] + 4.0 * shape.layers * sum(o * math.ceil(i / 128)
                                                                          for _, i, o in per_block)
    else:
        raise ValueError(f"unknown base storage {base}")
    return rest + projections + 16.0 * shape.lora_parameters(lora_rank)


def features(shape: LlamaShape, combo: Combo, batch: int, tokens: int, positions: float, lora_rank: int) -> dict:
    """The quantities each fitted term multiplies, for one model shape, combination and batch shape.

    positions: the positions projected to the vocabulary per step (kft: trained tokens; the Trainer:
    every position)."""
    return {"float_bytes": 4.0 * shape.parameters()["total"],
            "held_bytes": held_bytes(shape, combo.base, lora_rank),
            "token_layer_hidden": float(batch * tokens * shape.layers * shape.hidden),
            "score_elements": float(batch * shape.heads * tokens ** 2 * (1 if combo.checkpointing else shape.layers))
            if combo.stores_scores else 0.0,
            "logit_bytes": LOGIT_COPIES * 4.0 * positions * shape.vocab}


# what each fitted quantity is regressed on (in the order terms are dropped last to first)
MODELS = {"load_peak": ("float_bytes",), "ready_rss": ("held_bytes",),
          "activation": ("token_layer_hidden", "score_elements")}


def least_squares(x: np.ndarray, y: np.ndarray, names: tuple) -> dict:
    """y ~ intercept + x @ coefficients; terms that the rows cannot determine (fewer rows than terms,
    or a column the rows do not vary) are dropped from the end and named."""
    names = list(names)
    x = np.asarray(x, np.float64).reshape(len(y), -1)
    keep = [j for j in range(x.shape[1]) if np.ptp(x[:, j]) > 0]
    dropped = [names[j] for j in range(x.shape[1]) if j not in keep]
    while True:
        design = np.column_stack([np.ones(len(y))] + [x[:, j] / max(np.abs(x[:, j]).max(), 1.0) for j in keep])
        if np.linalg.matrix_rank(design) == design.shape[1] or not keep:
            break
        dropped.insert(0, names[keep.pop()])
    solution = np.linalg.lstsq(design, np.asarray(y, np.float64), rcond=None)[0]
    scales = [max(np.abs(x[:, j]).max(), 1.0) for j in keep]
    coefficients = {names[j]: float(solution[k + 1] / s) for k, (j, s) in enumerate(zip(keep, scales))}
    residual = np.asarray(y, np.float64) - design @ solution
    return {"intercept": float(solution[0]), "coefficients": coefficients, "dropped": dropped,
            "rows": int(len(y)), "residual_rms": float(np.sqrt(np.mean(residual ** 2))),
            "exact": len(y) <= design.shape[1]}


def predict(fit: dict, feats: dict) -> float:
    return fit["intercept"] + sum(c * feats[name] for name, c in fit["coefficients"].items())


def fit_combo(rows: list[dict]) -> dict:
    """The three fits of one combination from its measured rows (see the module docstring)."""
    ok = [r for r in rows if r.get("status") == "ok"]
    if not ok:
        return {}
    names = dict(MODELS)
    if not any(r["features"]["score_elements"] for r in ok):  # memory-efficient attention keeps no scores
        names["activation"] = ("token_layer_hidden",)
    targets = {"load_peak": [r["memory"]["load_peak"] for r in ok],
               "ready_rss": [r["memory"]["ready_rss"] for r in ok],
               "activation": [r["memory"]["train_peak"] - r["memory"]["ready_rss"] - r["features"]["logit_bytes"]
                              for r in ok]}
    return {k: least_squares(np.array([[r["features"][n] for n in names[k]] for r in ok]), np.array(targets[k]),
                             names[k]) for k in MODELS}


def project(fits: dict, feats: dict) -> dict:
    """Peak memory of the target from one combination's fits: max(loading, ready + training)."""
    load = predict(fits["load_peak"], feats)
    ready = predict(fits["ready_rss"], feats)
    activation = predict(fits["activation"], feats) + feats["logit_bytes"]
    peak = max(load, ready + activation)
    constant = fits["ready_rss"]["intercept"]  # the interpreter and libraries: host memory on an accelerator
    return {"load_peak": load, "ready": ready, "training": activation, "peak": peak,
            "process_constant": constant, "device_estimate": peak - constant,
            "within": {name: peak - constant <= limit for name, limit in ACCELERATORS.items()}}


def projections(report_rows: list[dict], combos: list[Combo], target_batch: int, target_tokens: int,
                lora_rank: int) -> dict:
    """Per combination: its fits and the target's projected memory."""
    out = {}
    for combo in combos:
        rows = [r for r in report_rows if r["combo"] == combo.name]
        fits = fit_combo(rows)
        if not fits:
            out[combo.name] = {"status": "no measured rows"}
            continue
        ok = [r for r in rows if r.get("status") == "ok"]
        share = float(np.mean([r["projected_positions"] / (r["batch"] * r["tokens"]) for r in ok]))
        feats = features(TARGET, combo, target_batch, target_tokens, share * target_batch * target_tokens,
                         lora_rank)
        out[combo.name] = {"status": "ok", "fits": fits, "features": feats,
                           **project(fits, feats)}
    return out
