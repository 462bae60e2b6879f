"""Metrics computed from predictions: accuracy, macro P/R/F1, confusion matrix; entity-level P/R/F1;
ROUGE, BLEU and exact match of generated text."""

from __future__ import annotations

import numpy as np


def confusion_matrix(y_true: np.ndarray, y_pred: np.ndarray, num_classes: int) -> np.ndarray:
    """Rows are true classes, columns predicted classes."""
    cm = np.zeros((num_classes, num_classes), dtype=np.int64)
    np.add.at(cm, (np.asarray(y_true), np.asarray(y_pred)), 1)
    return cm


def classification_report(y_true: np.ndarray, y_pred: np.ndarray, names: list[str]) -> dict:
    """Per-class precision/recall/F1 and their unweighted (macro) means.

    A class never predicted has precision 0, one absent from y_true has recall 0 (and is left out of
    the macro means, as it has no support).
    """
    cm = confusion_matrix(y_true, y_pred, len(names))
    tp = np.diag(cm).astype(np.float64)
    predicted = cm.sum(axis=0)
    support = cm.sum(axis=1)
    precision = np.divide(tp, predicted, out=np.zeros_like(tp), where=predicted > 0)
    recall = np.divide(tp, support, out=np.zeros_like(tp), where=support > 0)
    denom = precision + recall
    f1 = np.divide(2 * precision * recall, denom, out=np.zeros_like(tp), where=denom > 0)
    present = support > 0
    total = int(support.sum())
    return {
        "examples": total,
        "accuracy": float(tp.sum() / total) if total else 0.0,
        "macro_precision": float(precision[present].mean()) if present.any() else 0.0,
        "macro_recall": float(recall[present].mean()) if present.any() else 0.0,
        "macro_f1": float(f1[present].mean()) if present.any() else 0.0,
        "per_class": {
            name: {"precision": float(p), "recall": float(r), "f1": float(f), "support": int(s)}
            for name, p, r, f, s in zip(names, precision, recall, f1, support)
        },
        "confusion_matrix": cm.tolist(),
    }


def format_report(report: dict, names: list[str]) -> str:
    """The per-class table as text, for logs."""
    width = max(10, *(len(n) for n in names))
    lines = [f"{'class':<{width}}  precision  recall     f1  support"]
    for name in names:
        c = report["per_class"][name]
        lines.append(f"{name:<{width}}  {c['precision']:9.4f}  {c['recall']:6.4f}  {c['f1']:.4f}  "
                     f"{c['support']:7d}")
    lines.append(f"{'macro avg':<{width}}  {report['macro_precision']:9.4f}  {report['macro_recall']:6.4f}  "
                 f"{report['macro_f1']:.4f}  {report['examples']:7d}")
    lines.append(f"accuracy {report['accuracy']:.4f}")
    return "\n".join(lines)


def entity_spans(tags: list[str]) -> list[tuple[str, int, int]]:
    """(type, first word, last word + 1) of every entity in one sentence's IOB2 tags.

    As in the CoNLL evaluation: `B-X` starts an entity; `I-X` continues it when the previous tag
    is `B-X` or `I-X` of the same type, and otherwise starts a new one (so an ill-formed `I-X`
    still counts as an entity, which is what the CoNLL scorer does).
    """
    spans, kind, start = [], None, 0
    for i, tag in enumerate(list(tags) + ["O"]):
        prefix, _, label = tag.partition("-")
        continues = prefix == "I" and label == kind
        if kind is not None and not continues:
            spans.append((kind, start, i))
            kind = None
        if prefix == "B" or (prefix == "I" and not continues):
            kind, start = label, i
    return spans


def entity_report(true_tags: list[list[str]], pred_tags: list[list[str]]) -> dict:
    """Entity-level precision/recall/F1 (span and type must both match), micro and per type, and
    word-level tag accuracy, over sentences of word tags."""
    if len(true_tags) != len(pred_tags):
        raise ValueError(f"{len(true_tags)} gold sentences but {len(pred_tags)} predicted")
    counts: dict = {}
    correct_words = words = 0
    for gold, pred in zip(true_tags, pred_tags):
        if len(gold) != len(pred):
            raise ValueError(f"a sentence has {len(gold)} gold tags but {len(pred)} predicted")
        words += len(gold)
        correct_words += sum(g == p for g, p in zip(gold, pred))
        g, p = set(entity_spans(gold)), set(entity_spans(pred))
        for span in g | p:
            c = counts.setdefault(span[0], [0, 0, 0])  # true positives, predicted, gold
            c[0] += span in g and span in p
            c[1] += span in p
            c[2] += span in g

    def prf(tp, predicted, gold):
        precision = tp / predicted if predicted else 0.0
        recall = tp / gold if gold else 0.0
        f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
        return {"precision": precision, "recall": recall, "f1": f1, "support": gold, "predicted": predicted}

    total = [sum(c[i] for c in counts.values()) for i in range(3)]
    micro = prf(*total)
    return {"entity_precision": micro["precision"], "entity_recall": micro["recall"],
            "entity_f1": micro["f1"], "entities": micro["support"], "predicted_entities": micro["predicted"],
            "token_accuracy": correct_words / words if words else 0.0, "words": words,
            "per_type": {kind: prf(*counts[kind]) for kind in sorted(counts)}}


def generation_scores(predictions: list[str], references: list[str]) -> dict:
    """ROUGE-1/2/L/Lsum F1 (x100, Porter stemming, as in the summarisation literature), corpus BLEU
    (sacreBLEU's default 13a tokenisation), exact match after trimming whitespace."""
    import sacrebleu
    from rouge_score import rouge_scorer

    scorer = rouge_scorer.RougeScorer(["rouge1", "rouge2", "rougeL", "rougeLsum"], use_stemmer=True)
    totals = {"rouge1": [], "rouge2": [], "rougeL": [], "rougeLsum": []}
    for p, r in zip(predictions, references):
        # rougeLsum splits summaries into sentences at newlines
        scores = scorer.score(r.strip(), p.strip())
        for k in totals:
            totals[k].append(scores[k].fmeasure)
    out = {k: round(100 * float(np.mean(v)), 3) if v else 0.0 for k, v in totals.items()}
    out["bleu"] = round(float(sacrebleu.corpus_bleu(predictions, [references]).score), 3) if predictions else 0.0
    out["exact_match"] = round(float(np.mean([p.strip() == r.strip() for p, r in
                                               zip(predictions, references)])), 4) if predictions else 0.0
    return out
