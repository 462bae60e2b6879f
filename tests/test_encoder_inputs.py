"""The encoder heads' shared inputs and backbone call (kft/models/encoder_inputs.py)."""

from __future__ import annotations

import numpy as np

from kft.models import backbones, encoder_inputs
from kft.tasks import question_answering, token_classification


def _pooler_trainable(model) -> bool:
    return any(w.path.startswith("pooled_dense") for w in model.trainable_weights)


def test_the_token_and_span_heads_freeze_the_pooler_they_do_not_read(tiny_preset):
    token = token_classification.build_model(backbones.load(tiny_preset).backbone, 3, 0.1)
    span = question_answering.build_model(backbones.load(tiny_preset).backbone, 0.1)
    assert not _pooler_trainable(token) and not _pooler_trainable(span)
    assert any(w.path.startswith("tagger") for w in token.trainable_weights)


def test_a_head_that_reads_the_pooler_keeps_it_trainable_and_segment_ids_reach_the_backbone(tiny_preset):
    backbone = backbones.load(tiny_preset).backbone
    seen = []

    def segments(token_ids, padding_mask):
        seen.append(True)
        return encoder_inputs.one_segment(token_ids, padding_mask)

    inputs, outputs = encoder_inputs.call_backbone(backbone, uses_pooler=True, segment_ids=segments)
    assert sorted(inputs) == ["padding_mask", "token_ids"] and seen == [True]
    assert any(layer.name == "pooled_dense" and layer.trainable for layer in backbone.layers)


def test_the_sequence_output_is_read_from_a_dict_of_outputs_or_is_the_output_itself():
    sequence = np.zeros((1, 4, 8))
    assert encoder_inputs.sequence_output({"sequence_output": sequence, "pooled_output": None}) is sequence
    assert encoder_inputs.sequence_output(sequence) is sequence
