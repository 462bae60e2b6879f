"""SQuAD's exact match and F1, with the official evaluation scripts' (v1.1, v2.0) normalisation.

An answer is compared after lower-casing, removing punctuation and the articles a/an/the, and
collapsing whitespace; a question scores its best reference. As in the v2.0 script, an unanswerable
question has the single reference "", so only an empty prediction scores on it.
"""

from __future__ import annotations

import collections
import re
import string

from kft.tasks.question_answering.data import Questions

_PUNCTUATION = frozenset(string.punctuation)
_ARTICLES = re.compile(r"\b(a|an|the)\b")


def normalize_answer(s: str) -> str:
    s = "".join(ch for ch in s.lower() if ch not in _PUNCTUATION)
    return " ".join(_ARTICLES.sub(" ", s).split())


def _references(references: list[str]) -> list[str]:
    # v2.0: references that normalise to nothing are dropped; none left means "no answer".
    return [r for r in references if normalize_answer(r)] or [""]


def exact_match(prediction: str, references: list[str]) -> float:
    predicted = normalize_answer(prediction)
    return max(float(predicted == normalize_answer(r)) for r in _references(references))


def _f1(predicted: list[str], reference: list[str]) -> float:
    if not predicted or not reference:  # an empty side scores 1 only against another empty one
        return float(predicted == reference)
    common = sum((collections.Counter(predicted) & collections.Counter(reference)).values())
    if not common:
        return 0.0
    precision, recall = common / len(predicted), common / len(reference)
    return 2 * precision * recall / (precision + recall)


def f1(prediction: str, references: list[str]) -> float:
    """Token-level F1 of the normalised answers, the best over the references."""
    predicted = normalize_answer(prediction).split()
    return max(_f1(predicted, normalize_answer(r).split()) for r in _references(references))


def report(predictions: dict[str, str], questions: Questions) -> dict:
    """Exact match and F1 in percent over `questions`; a question without a prediction counts as
    answered with "". With unanswerable questions, also the scores on each kind (HasAns / NoAns)."""
    scores = {True: ([], []), False: ([], [])}  # has answers -> (exact match, f1) per question
    missing = answered = 0
    for q in questions.items:
        if q.id not in predictions:
            missing += 1
        prediction = predictions.get(q.id, "")
        answered += bool(prediction.strip())
        references = [text for text, _ in q.answers]
        em, f = scores[bool(q.answers)]
        em.append(exact_match(prediction, references))
        f.append(f1(prediction, references))

    def percent(values: list[float]) -> float:
        return 100.0 * sum(values) / len(values) if values else 0.0

    every_em, every_f1 = scores[True][0] + scores[False][0], scores[True][1] + scores[False][1]
    out = {"exact_match": percent(every_em), "f1": percent(every_f1), "questions": len(every_em),
           "answered": answered, "missing": missing}
    if scores[False][0]:
        for prefix, has in (("has_ans", True), ("no_ans", False)):
            out[f"{prefix}_exact_match"] = percent(scores[has][0])
            out[f"{prefix}_f1"] = percent(scores[has][1])
            out[f"{prefix}_questions"] = len(scores[has][0])
    return out
