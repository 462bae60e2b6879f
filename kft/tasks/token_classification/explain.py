"""Integrated-gradient attributions of each tagged word's tag to the words of its text."""

from __future__ import annotations

import numpy as np

from kft.analysis import attributions


def explain(run, texts: list[str], steps: int, target: str = "", max_steps: int | None = None) -> list[dict]:
    """One record per word tagged with an entity tag (not O), or with `target` if given."""
    import tensorflow as tf

    from kft.tasks.token_classification import inputs as token_inputs

    if target and target not in run.names:
        from kft.config import FlagError

        raise FlagError(f"--target={target}: the run's tags are {run.names}")
    uses_crf = run.config.crf
    records = []
    unknown = token_inputs._unknown_id(run.loaded.tokenizer)
    for text in texts:
        w = attributions.split_words(text, run.loaded.tokenizer, run.loaded.packing, run.sequence_length, unknown)
        mask = np.ones_like(w.token_ids)

        def probabilities_of(outputs):
            return tf.nn.softmax(outputs, axis=-1) if uses_crf else outputs

        out = probabilities_of(run.model({"token_ids": w.token_ids[None], "padding_mask": mask[None]},
                                         training=False)).numpy()[0]
        for i, position in enumerate(w.first_piece):
            if position < 0:
                continue
            predicted = int(out[position].argmax())
            if (target and run.names[predicted] != target) or (not target and run.names[predicted] == "O"):
                continue
            result = attributions.integrated_gradients(
                run.model, w.token_ids, mask, w.piece_word >= 0,
                lambda o, q=int(position), t=predicted: probabilities_of(o)[:, q, t], run.loaded.packing.pad, steps,
                max_steps=max_steps)
            per_word = attributions.word_attributions(result, w.piece_word, len(w.words))
            records.append({
                "text": text, "word_index": i, "word": w.words[i], "tag": run.names[predicted],
                "probability": float(out[position, predicted]),
                "title": f"{w.words[i]!r} (word {i + 1}) -> {run.names[predicted]} ({out[position, predicted]:.3f})",
                "words": [{"word": word, "start": a, "end": b, "attribution": float(v)}
                          for word, a, b, v in zip(w.words, w.starts, w.ends, per_word)],
                "f_input": result.output, "f_baseline": result.baseline_output,
                "attribution_sum": result.total, "completeness_error": result.completeness_error,
                "ig_steps": result.steps, "truncated_pieces": w.cut_pieces,
            })
    return records
