"""Alignment: words -> word pieces (first piece tagged) -> windows -> one prediction per word."""

import pytest

from kft.models import backbones
from kft.tasks.token_classification import inputs as token_inputs
from kft.tasks.token_classification.inputs import IGNORE

SENTENCES = [["a", "wonderful", "film"], ["the", "plot", "is", "a", "mess", "and", "a", "bore"],
             ["good"], ["unbelievably", "boring", "unbelievably", "boring", "unbelievably", "boring"]]


@pytest.fixture(scope="module")
def loaded(tiny_preset):
    return backbones.load(tiny_preset)


@pytest.mark.parametrize("sequence_length,stride", [(64, 2), (8, 2), (5, 1), (6, 0)])
def test_every_word_round_trips_through_pieces_and_windows(loaded, sequence_length, stride):
    pieces, empty = token_inputs.sentence_pieces(loaded.tokenizer, SENTENCES)
    assert empty == 0 and [len(p) for p in pieces] == [len(s) for s in SENTENCES]
    tags = [[(7 * s + w) % 5 for w in range(len(words))] for s, words in enumerate(SENTENCES)]
    windows = token_inputs.encode(pieces, tags, loaded.packing, sequence_length, stride)
    assert max(windows.lengths) <= sequence_length
    for ids, labels in zip(windows.ids, windows.labels):
        assert ids[0] == loaded.packing.start[0] and ids[-1] == loaded.packing.end[0]
        assert labels[0] == IGNORE and labels[-1] == IGNORE
    # a model that outputs, at each position, the label placed there recovers every word's tag
    back = token_inputs.word_predictions(windows, windows.labels)
    assert [b.tolist() for b in back] == tags
    if sequence_length == 64:
        assert len(windows.ids) == len(SENTENCES) and windows.split_sentences == 0
    else:
        assert windows.split_sentences > 0 and len(windows.ids) > len(SENTENCES)


def test_only_first_pieces_carry_a_tag(loaded):
    pieces, _ = token_inputs.sentence_pieces(loaded.tokenizer, [["unbelievably", "good"]])
    windows = token_inputs.encode(pieces, [[3, 4]], loaded.packing, 64, 8)
    labels = windows.labels[0]
    assert (labels != IGNORE).sum() == 2
    assert labels[1] == 3 and labels[1 + len(pieces[0][0])] == 4


def test_windows_cover_all_words_and_overlap_at_most_stride():
    counts = [2, 1, 3, 1, 1, 2, 4, 1]
    spans = token_inputs.word_windows(counts, room=5, stride=2)
    covered = sorted({w for a, b in spans for w in range(a, b)})
    assert covered == list(range(len(counts)))
    for (a, b), (c, d) in zip(spans, spans[1:]):
        assert c > a and sum(counts[c:b]) <= 2 and sum(counts[a:b]) <= 5
    assert token_inputs.word_windows([9, 1], room=4, stride=1)[0] == (0, 1)  # a long word alone
