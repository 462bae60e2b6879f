"""Entity-level precision, recall and F1 on hand-made cases."""

import pytest

from kft.reporting.metrics import entity_report, entity_spans


def test_spans_follow_the_conll_rules():
    assert entity_spans(["B-PER", "I-PER", "O", "B-LOC"]) == [("PER", 0, 2), ("LOC", 3, 4)]  # trailing
    assert entity_spans(["B-PER", "B-PER"]) == [("PER", 0, 1), ("PER", 1, 2)]  # adjacent, same type
    assert entity_spans(["O", "I-ORG", "I-ORG"]) == [("ORG", 1, 3)]  # ill-formed start still counts
    assert entity_spans(["B-PER", "I-LOC"]) == [("PER", 0, 1), ("LOC", 1, 2)]  # type change splits
    assert entity_spans([]) == [] and entity_spans(["O", "O"]) == []


def test_an_entity_counts_only_when_span_and_type_both_match():
    gold = [["B-PER", "I-PER", "O", "B-LOC"],   # PER 0-2, LOC 3-4 (trailing entity)
            ["B-ORG", "I-ORG", "I-ORG", "O"]]   # ORG 0-3
    pred = [["B-PER", "O", "O", "B-ORG"],        # boundary too short; right span, wrong type
            ["B-ORG", "I-ORG", "I-ORG", "O"]]   # exact
    r = entity_report(gold, pred)
    assert (r["entities"], r["predicted_entities"]) == (3, 3)
    assert r["entity_precision"] == pytest.approx(1 / 3) and r["entity_recall"] == pytest.approx(1 / 3)
    assert r["entity_f1"] == pytest.approx(1 / 3)
    assert r["per_type"]["ORG"] == {"precision": 0.5, "recall": 1.0, "f1": pytest.approx(2 / 3),
                                    "support": 1, "predicted": 2}
    assert r["per_type"]["PER"]["f1"] == 0.0 and r["per_type"]["LOC"]["recall"] == 0.0
    assert r["token_accuracy"] == pytest.approx(6 / 8)


def test_nested_looking_boundaries_are_distinct_entities():
    gold = [["B-LOC", "I-LOC", "I-LOC"]]
    pred = [["B-LOC", "B-LOC", "I-LOC"]]  # splits one entity into two, neither matches
    r = entity_report(gold, pred)
    assert r["entity_precision"] == 0.0 and r["entity_recall"] == 0.0 and r["entity_f1"] == 0.0
    perfect = entity_report(gold, gold)
    assert perfect["entity_f1"] == 1.0 and perfect["token_accuracy"] == 1.0


def test_mismatched_lengths_are_an_error():
    with pytest.raises(ValueError, match="2 gold tags but 1 predicted"):
        entity_report([["O", "O"]], [["O"]])
