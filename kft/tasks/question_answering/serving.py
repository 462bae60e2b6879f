"""The serving graph of a question-answering export: (question, context) -> answer, in TF ops.

`serving_default` takes `question` and `context` (tf.string [batch] each) and returns `answer`
(the text of the context it points at), `start_char` and `end_char` (character offsets into the
context as given), `score` (start + end logit of the chosen span), `null_score` and
`question_truncated` (question pieces beyond --max_query_length). A long context is cut into the
same windows as in training (features.windows) and answered from its best window; decoding is
features.graph_best_spans, the graph twin of the evaluation's decoding. `serve_token_ids` takes
packed windows (token_ids, padding_mask) and returns their start and end logits.
"""

from __future__ import annotations

import tensorflow as tf

from kft.models import backbones
from kft.config import Config
from kft.tasks.question_answering import features


def endpoints(model, loaded: backbones.Loaded, sequence_length: int, config: Config, null_answers: bool) -> dict:
    tokenizer, packing = loaded.tokenizer, loaded.packing
    lengths = tf.constant(features.piece_lengths(tokenizer.get_vocabulary()))
    unknown = int(tokenizer.token_to_id(getattr(tokenizer, "oov_token", None) or "[UNK]"))

    def logits_of(token_ids, padding_mask):
        # An empty request arrives as [0, 0]; the backbone needs one position to index into.
        short = tf.maximum(0, 1 - tf.shape(token_ids)[1])
        token_ids = tf.pad(token_ids, [[0, 0], [0, short]], constant_values=packing.pad)
        padding_mask = tf.pad(padding_mask, [[0, 0], [0, short]])
        return model({"token_ids": token_ids, "padding_mask": padding_mask}, training=False)

    def serve_token_ids(token_ids, padding_mask):
        logits = logits_of(token_ids, padding_mask)
        return {"start_logits": logits[:, :, 0], "end_logits": logits[:, :, 1]}

    def serve(question, context):
        def tokenize(texts):
            return tokenizer(texts)

        q = tf.cast(tokenizer(question), tf.int32)
        c_ids, c_start, c_end = features.context_pieces(tokenize, context, lengths, unknown)
        w = features.windows(q, c_ids, packing, sequence_length, config.max_query_length, config.doc_stride)
        token_ids = w.ids.to_tensor(default_value=packing.pad)
        padding_mask = tf.ones_like(w.ids).to_tensor(default_value=0)
        logits = logits_of(token_ids, padding_mask)
        score, start, end, null = features.graph_best_spans(logits, w.offset, w.context_length, config.n_best,
                                                            config.max_answer_length)
        batch = tf.shape(question)[0]
        windows = tf.shape(w.example)[0]
        best = tf.math.unsorted_segment_max(score, w.example, batch)
        chosen = tf.math.unsorted_segment_min(
            tf.where(score >= tf.gather(best, w.example), tf.range(windows), windows), w.example, batch)
        chosen = tf.minimum(chosen, tf.maximum(windows - 1, 0))  # every question has a window
        null_score = tf.math.unsorted_segment_min(null, w.example, batch)
        best_score = tf.gather(score, chosen)
        base = tf.cast(tf.gather(c_ids.row_splits[:-1], tf.range(batch)), tf.int32)
        first = tf.gather(w.first_piece, chosen) - tf.gather(w.offset, chosen)
        piece_start = base + first + tf.gather(start, chosen)
        piece_end = base + first + tf.gather(end, chosen)
        found = tf.math.is_finite(best_score)
        if null_answers:
            found &= ~(null_score > best_score + config.null_score_threshold)
        size = tf.maximum(tf.shape(c_start.flat_values)[0], 1)
        flat_start = tf.concat([tf.cast(c_start.flat_values, tf.int32), [0]], 0)
        flat_end = tf.concat([tf.cast(c_end.flat_values, tf.int32), [0]], 0)
        start_char = tf.where(found, tf.gather(flat_start, tf.clip_by_value(piece_start, 0, size - 1)), 0)
        end_char = tf.where(found, tf.gather(flat_end, tf.clip_by_value(piece_end, 0, size - 1)), 0)
        answer = tf.strings.substr(context, start_char, end_char - start_char, unit="UTF8_CHAR")
        return {"answer": answer, "start_char": start_char, "end_char": end_char, "score": best_score,
                "null_score": null_score, "question_truncated": w.question_cut}

    return {
        "serving_default": (serve, [tf.TensorSpec([None], tf.string, name="question"),
                                    tf.TensorSpec([None], tf.string, name="context")]),
        "serve_token_ids": (serve_token_ids, [tf.TensorSpec([None, None], tf.int32, name="token_ids"),
                                              tf.TensorSpec([None, None], tf.int32, name="padding_mask")]),
    }
