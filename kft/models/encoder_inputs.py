"""The inputs of an encoder head's model and the backbone's call on them, shared by the encoder tasks
(classification, token classification, question answering).

Every such model takes token_ids and padding_mask ([batch, length] int32), as the exports feed
them; segment ids, where a backbone takes them, are computed inside the model from those two.
"""

from __future__ import annotations

import keras


def one_segment(token_ids, padding_mask):
    """Segment ids of a single text: 0 everywhere."""
    return keras.ops.zeros_like(token_ids)


def call_backbone(backbone: keras.Model, uses_pooler: bool = False, segment_ids=one_segment):
    """(the model's inputs {token_ids, padding_mask}, the backbone's outputs on them).

    A backbone that takes segment ids gets `segment_ids(token_ids, padding_mask)`. Unless the head
    reads the pooled output, the pooler is not on its path and gets no gradient: it is frozen, so
    that it stays as loaded and carries no optimizer state.
    """
    token_ids = keras.Input(shape=(None,), dtype="int32", name="token_ids")
    padding_mask = keras.Input(shape=(None,), dtype="int32", name="padding_mask")
    feed = {"token_ids": token_ids, "padding_mask": padding_mask}
    if "segment_ids" in (backbone.input if isinstance(backbone.input, dict) else {}):
        feed["segment_ids"] = segment_ids(token_ids, padding_mask)
    if not uses_pooler:
        for layer in backbone.layers:
            if layer.name == "pooled_dense":
                layer.trainable = False
    return {"token_ids": token_ids, "padding_mask": padding_mask}, backbone(feed)


def sequence_output(outputs):
    """The per-position vectors [batch, length, hidden] of a backbone's outputs."""
    return outputs["sequence_output"] if isinstance(outputs, dict) else outputs
