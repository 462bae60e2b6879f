"""Scores of generated text against references: ROUGE (rouge-score), BLEU (sacreBLEU), exact match."""

from __future__ import annotations

import numpy as np


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


def format_report(report: dict) -> str:
    lines = [f"  loss {report['loss']:.4f}, perplexity {report['perplexity']:.3f}, next-token accuracy "
             f"{report['token_accuracy']:.4f} over {report['trained_tokens']} completion tokens"]
    if "rougeL" in report:
        lines.append(f"  generated for {report['generated_examples']} prompts in "
                     f"{report['generation_seconds']:.1f}s ({report['generated_tokens_per_second']:.1f} "
                     f"tokens/s; mean {report['mean_generated_tokens']:.1f} tokens, "
                     f"{100 * report['stopped_at_eos']:.1f}% ended with EOS)")
        lines.append(f"  ROUGE-1 {report['rouge1']:.2f}  ROUGE-2 {report['rouge2']:.2f}  ROUGE-L "
                     f"{report['rougeL']:.2f}  ROUGE-Lsum {report['rougeLsum']:.2f}  BLEU {report['bleu']:.2f}"
                     f"  exact match {report['exact_match']:.4f}")
    return "\n".join(lines)
