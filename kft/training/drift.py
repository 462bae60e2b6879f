"""How far fine-tuning moved the backbone from where it started: weights, representations and, for
decoders, perplexity on general text.

Measures for metrics.json's `drift` section, the first two per transformer layer and overall:
- relative weight distance ||theta - theta_0|| / ||theta_0|| over each block's weights (a LoRA
  projection counts with its update merged: W + BA is the weight that computes);
- linear CKA (Kornblith et al., 2019) between the starting and the fine-tuned backbone's sentence
  representations (each block's output, mean over a sentence's tokens) on a fixed general-text
  sample that ships with kft (kft/sample_data/general_text.txt), not the task's data: 1 = the same
  representation up to rotation and scale; lower = fine-tuning changed what the layer encodes;
- for decoder LLMs (--task=causal_lm), the perplexity of the starting and the fine-tuned model on
  the same sample, each sentence packed as plain text is for continued pretraining: how much worse
  (or better) the model predicts general text after fine-tuning.

theta_0, the starting representations and the starting perplexity are taken when the backbone is
loaded, before the tuning method changes it and before a checkpoint is restored: the pretrained (or
the copied student's) starting point.
"""

from __future__ import annotations

import dataclasses
import math
import os

import keras
import numpy as np

from kft.models import backbones
from kft import SAMPLE_DATA

GENERAL_TEXT = os.path.join(SAMPLE_DATA, "general_text.txt")


@dataclasses.dataclass
class Snapshot:
    """The backbone as it was before training: its weights, and its representations of the
    general-text sample (computed then, so the start never has to be rebuilt)."""

    values: list[np.ndarray]
    by_id: dict  # id(variable) -> index into values
    probe: tuple | None = None  # (token_ids, padding_mask) of the general-text sample
    representations: list | None = None  # per block [n, hidden], before training
    texts: object = None  # decoders: the sample packed for next-token scoring (the scorer's)
    perplexity: float | None = None  # decoders: the starting model's perplexity on `texts`
    scorer: object = None  # decoders: the task's perplexity module (see `snapshot`)


def snapshot(loaded, representations: bool = True, scorer=None) -> Snapshot:
    """theta_0 and the starting representations; with `scorer` (a decoder task's perplexity module:
    `plain_texts(loaded, texts)` and `perplexity(model, texts)`), the starting perplexity too."""
    weights = loaded.backbone.weights
    snap = Snapshot([np.array(w.numpy()) for w in weights], {id(w): i for i, w in enumerate(weights)})
    # Encoder–decoder backbones (BART, T5) read two sequences: their drift is the weight distance.
    two = isinstance(loaded.backbone.input, dict) and "encoder_token_ids" in loaded.backbone.input
    if representations and not two:
        snap.probe = _probe_inputs(loaded, general_text())
        snap.representations = layer_representations(loaded.backbone, *snap.probe)
        if scorer is not None:
            snap.scorer = scorer
            snap.texts = scorer.plain_texts(loaded, general_text())
            snap.perplexity, _ = scorer.perplexity(loaded.backbone, snap.texts)
    return snap


def _effective(block) -> list[tuple[object, np.ndarray]]:
    """(starting variable, current value) for each weight a block computes with."""
    from kft.methods.lora import LoRAProjection

    out, skip = [], set()
    for layer in block._flatten_layers():
        if isinstance(layer, LoRAProjection):
            out.append((layer.base.kernel, np.asarray(layer.merged_kernel())))
            skip.update({id(layer.base.kernel), id(layer.lora_a), id(layer.lora_b)})
    for w in block.weights:
        if id(w) not in skip:
            out.append((w, np.asarray(w.numpy())))
    return out


def relative_distance(start: list[np.ndarray], now: list[np.ndarray]) -> float:
    num = np.sqrt(sum(float(np.sum((b.astype(np.float64) - a) ** 2)) for a, b in zip(start, now)))
    den = np.sqrt(sum(float(np.sum(a.astype(np.float64) ** 2)) for a in start))
    return num / max(den, 1e-12)


def weight_distance(snap: Snapshot, backbone: keras.Model) -> dict:
    """Relative distance per transformer block and over all of them."""
    per_layer, all_start, all_now = [], [], []
    for block in backbones.transformer_layers(backbone):
        start, now = [], []
        for variable, value in _effective(block):
            index = snap.by_id.get(id(variable))
            if index is not None:  # a method's own weights (prompts, LoRA factors) have no theta_0
                start.append(snap.values[index])
                now.append(value)
        per_layer.append(round(float(relative_distance(start, now)), 6))
        all_start += start
        all_now += now
    return {"per_layer": per_layer, "overall": round(float(relative_distance(all_start, all_now)), 6)}


def linear_cka(x: np.ndarray, y: np.ndarray) -> float:
    """Linear CKA of two representations of the same n examples ([n, d1], [n, d2])."""
    x = x.astype(np.float64) - x.mean(0, keepdims=True)
    y = y.astype(np.float64) - y.mean(0, keepdims=True)
    cross = np.linalg.norm(y.T @ x) ** 2
    return float(cross / max(np.linalg.norm(x.T @ x) * np.linalg.norm(y.T @ y), 1e-30))


def layer_representations(backbone: keras.Model, token_ids: np.ndarray, padding_mask: np.ndarray,
                          batch_size: int = 32) -> list[np.ndarray]:
    """Each block's output averaged over a text's real tokens: a list of [n, hidden], lowest first."""
    blocks = backbones.transformer_layers(backbone)
    probe = keras.Model(backbone.input, [block.output for block in blocks])
    feed = {name: None for name in (backbone.input if isinstance(backbone.input, dict) else {})}
    out = [[] for _ in blocks]
    for i in range(0, len(token_ids), batch_size):
        ids, mask = token_ids[i:i + batch_size], padding_mask[i:i + batch_size]
        batch = {"token_ids": ids, "padding_mask": mask}
        if "segment_ids" in feed:
            batch["segment_ids"] = np.zeros_like(ids)
        outputs = probe(batch, training=False)
        if len(blocks) == 1:  # a one-output model returns the tensor itself
            outputs = [outputs]
        weights = mask[:, :, None].astype(np.float32)
        for k, h in enumerate(outputs):
            h = np.asarray(h, np.float32)
            out[k].append((h * weights).sum(1) / np.maximum(weights.sum(1), 1.0))
    return [np.concatenate(parts) for parts in out]


def general_text() -> list[str]:
    with open(GENERAL_TEXT, encoding="utf-8") as f:
        return [line.strip() for line in f if line.strip()]


def representation_similarity(snap: Snapshot, backbone: keras.Model) -> dict:
    """Linear CKA per block between the snapshot's representations and `backbone`'s now."""
    after = layer_representations(backbone, *snap.probe)
    per_layer = [round(linear_cka(a, b), 6) for a, b in zip(snap.representations, after)]
    return {"per_layer": per_layer, "mean": round(float(np.mean(per_layer)), 6), "texts": len(snap.probe[0])}


def anchors(snap: Snapshot, backbone: keras.Model) -> list[tuple[object, np.ndarray]]:
    """(variable, starting value) for every backbone weight that has one (L2-SP's theta_0)."""
    return [(w, snap.values[snap.by_id[id(w)]]) for w in backbone.weights if id(w) in snap.by_id]


def _probe_inputs(loaded, texts: list[str], length: int = 128) -> tuple[np.ndarray, np.ndarray]:
    """Token ids and padding mask of the general-text sample, packed as the backbone expects."""
    from kft.data import inputs

    packing = getattr(loaded, "packing", None)
    if packing is not None:
        encoded = inputs.encode(loaded.tokenizer, packing, texts, length)
        ids = encoded.ids.to_tensor(default_value=packing.pad).numpy()
        lengths = encoded.lengths
    else:  # a decoder: the text's tokens as they are
        rows = [list(np.asarray(r).reshape(-1))[:length] for r in loaded.tokenizer(texts)]
        lengths = np.array([len(r) for r in rows])
        ids = np.zeros((len(rows), max(lengths)), np.int32)
        for i, r in enumerate(rows):
            ids[i, :len(r)] = r
    mask = (np.arange(ids.shape[1])[None, :] < lengths[:, None]).astype(np.int32)
    return ids.astype(np.int32), mask


def perplexity_change(snap: Snapshot, model: keras.Model) -> dict:
    """The snapshot's perplexity on the general-text sample against `model`'s now."""
    after, tokens = snap.scorer.perplexity(model, snap.texts)
    before = snap.perplexity
    return {"before": round(before, 4), "after": round(after, 4), "change": round(after - before, 4),
            "relative_change": round((after - before) / before, 6), "tokens": tokens,
            "texts": len(snap.texts.lengths), "texts_cut": snap.texts.cut}


def perplexity_summary(drift_section: dict) -> str:
    """The perplexity part of the drift log line ('' when the section has none)."""
    p = drift_section.get("perplexity")
    if not p:
        return ""
    return (f"; perplexity {p['before']:.3f} before, {p['after']:.3f} after ({100 * p['relative_change']:+.2f}%, "
            f"{p['tokens']} tokens)")


def measure(snap: Snapshot, loaded, config, model: keras.Model | None = None) -> dict:
    """metrics.json's `drift` section for the backbone now, against its snapshot.

    Perplexity (decoders) is scored with `model` when given (the task's model: prompt vectors
    included), else with the backbone, which shares every layer and LoRA wrapper with the trained
    model and so computes what the export will (LoRA merged) without the prompt vectors.
    """
    from kft.methods import prompt as prompt_lib

    out = {"weights": weight_distance(snap, loaded.backbone),
           "sample": os.path.relpath(GENERAL_TEXT, os.path.dirname(os.path.dirname(SAMPLE_DATA)))}
    if snap.representations is not None:
        out["representations"] = representation_similarity(snap, loaded.backbone)
    with_prompt = model is not None and prompt_lib.prompt_layer(model) is not None
    if snap.perplexity is not None:
        out["perplexity"] = perplexity_change(snap, model if model is not None else loaded.backbone)
    if config.method in ("prompt", "prefix"):
        out["note"] = (f"--method={config.method} keeps every backbone weight frozen: the model's function "
                       "changes through the learned vectors, which these per-layer measures do not see")
        if "perplexity" in out:
            out["note"] += ("; the perplexity after training is the model's with its prompt vectors" if with_prompt
                            else "; the perplexity after training is the backbone's without the prompt vectors "
                                 "(the same function as before)")
    return out
