"""Integrated-gradient attributions of a classification run's decision to each word of a text."""

from __future__ import annotations

import numpy as np

from kft.analysis import attributions


def explain(run, texts: list[str], steps: int, target: str = "", max_steps: int | None = None) -> list[dict]:
    """One record per text: the explained label, its probability, attributions per word."""
    if target and target not in run.names:
        from kft.config import FlagError

        raise FlagError(f"--target={target}: the run's labels are {run.names}")
    records = []
    for text in texts:
        w = attributions.split_words(text, run.loaded.tokenizer, run.loaded.packing, run.sequence_length)
        mask = np.ones_like(w.token_ids)
        probabilities = run.model({"token_ids": w.token_ids[None], "padding_mask": mask[None]},
                                  training=False).numpy()[0]
        predicted = int(probabilities.argmax())
        k = run.names.index(target) if target else predicted
        result = attributions.integrated_gradients(
            run.model, w.token_ids, mask, w.piece_word >= 0, lambda out: out[:, k],
            run.loaded.packing.pad, steps, max_steps=max_steps)
        per_word = attributions.word_attributions(result, w.piece_word, len(w.words))
        records.append({
            "text": text, "predicted": run.names[predicted], "probability": float(probabilities[predicted]),
            "explained": run.names[k], "explained_probability": float(probabilities[k]),
            "title": f"{run.names[k]} ({probabilities[k]:.3f})" + ("" if k == predicted else
                                                                    f"; predicted {run.names[predicted]}"),
            "words": [{"word": word, "start": a, "end": b, "attribution": float(v)}
                      for word, a, b, v in zip(w.words, w.starts, w.ends, per_word)],
            "f_input": result.output, "f_baseline": result.baseline_output, "attribution_sum": result.total,
            "completeness_error": result.completeness_error, "ig_steps": result.steps,
            "truncated_pieces": w.cut_pieces,
        })
    return records
