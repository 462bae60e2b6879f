"""The evaluation reports and predictions files of the generating tasks (causal_lm, seq2seq); the
scores of generated text against references are kft.reporting.metrics.generation_scores."""

from __future__ import annotations

import dataclasses
import json
import math
import os
import time
from typing import Callable

import numpy as np
from absl import logging

from kft.reporting import metrics

HEADLINE = ("perplexity", "rougeL", "bleu")  # the report entries a generating task's export metadata copies


def epoch_scores(outputs: np.ndarray, sizes: np.ndarray) -> dict:
    """The epoch-end eval of rows of [loss sum, correct tokens]: mean loss, accuracy, score -loss."""
    loss = float(outputs[..., 0].sum() / max(1, sizes.sum()))
    return {"loss": loss, "accuracy": float(outputs[..., 1].sum() / max(1, sizes.sum())), "score": -loss}


def loss_report(outputs: np.ndarray, sizes: np.ndarray) -> dict:
    """Teacher-forced loss, perplexity and next-token accuracy of rows of [loss sum, correct tokens]."""
    loss = float(outputs[..., 0].sum() / max(1, sizes.sum()))
    return {"loss": round(loss, 5), "perplexity": round(math.exp(min(loss, 50.0)), 4),
            "token_accuracy": round(float(outputs[..., 1].sum() / max(1, sizes.sum())), 5),
            "trained_tokens": int(sizes.sum())}


def detokenize(tokenizer, ids) -> list[str]:
    """Generated ids as text; bytes that end inside a character become U+FFFD."""
    texts = [tokenizer.detokenize(np.asarray(x, np.int32)) if len(x) else "" for x in ids]
    return [t.numpy().decode("utf-8", "replace") if hasattr(t, "numpy") else str(t) for t in texts]


def generation_report(texts: list[str], references: list[str], ids, stopped, seconds: float) -> dict:
    """The scores of `texts` (generated as `ids` in `seconds`) and the generation's speed and stops."""
    report = metrics.generation_scores(texts, references)
    report.update(generated_examples=len(references), generation_seconds=round(seconds, 2),
                  mean_generated_tokens=round(float(np.mean([len(x) for x in ids])), 2),
                  stopped_at_eos=round(float(np.mean(stopped)), 4),
                  generated_tokens_per_second=round(sum(len(x) for x in ids) / max(seconds, 1e-9), 2))
    return report


def write_predictions(predictions: dict, model_dir: str) -> None:
    """predictions.jsonl (eval) and predictions_<split>.jsonl (others), a row a line."""
    import tensorflow as tf

    for k, rows in predictions.items():
        name = "predictions.jsonl" if k == "eval" else f"predictions_{k}.jsonl"
        with tf.io.gfile.GFile(os.path.join(model_dir, name), "w") as f:
            for row in rows:
                f.write(json.dumps(row, ensure_ascii=False) + "\n")


@dataclasses.dataclass
class GenerationEval:
    """The evaluate / epoch_eval / write_outputs of a generating task's Prepared.

    Every epoch end scores the eval split's teacher-forced loss. After training, each split reports
    its loss and, unless it is plain text or --max_new_tokens=0, greedy generations for its first
    --max_generate_examples inputs, scored against their references and kept for predictions.jsonl.
    """

    config: object
    splits: dict  # name -> causal_lm data.Examples
    sources: dict  # name -> the loop's feed
    inputs: dict  # name -> (generation input ids, their texts), one per example
    tokenizer: object
    make_generator: Callable  # model -> generator(ids, max_new_tokens); built once, on first use
    input_of: Callable  # example -> the predictions file's "input"
    noun: str  # what the inputs are called in the log
    predictions: dict = dataclasses.field(default_factory=dict)
    generator: Callable | None = None

    def epoch_eval(self, outputs) -> dict:
        return epoch_scores(outputs, self.sources["eval"].sizes)

    def evaluate(self, k: str, outputs, model) -> dict:
        config, split = self.config, self.splits[k]
        report = loss_report(outputs, self.sources[k].sizes)
        if split.plain_text or config.max_new_tokens <= 0:
            return report
        n = len(split) if not config.max_generate_examples else min(len(split), config.max_generate_examples)
        if self.generator is None:
            self.generator = self.make_generator(model)
        t = time.time()
        logging.info("generating up to %d tokens for %d %s %s ...", config.max_new_tokens, n, k, self.noun)
        ids, stopped = self.generator(self.inputs[k][0][:n], config.max_new_tokens)
        texts = detokenize(self.tokenizer, ids)
        examples = split.examples[:n]
        report.update(generation_report(texts, [e.completion for e in examples], ids, stopped, time.time() - t))
        self.predictions[k] = [{"line": e.line, "input": self.input_of(e), "prompt": p,
                                "reference": e.completion, "prediction": t_, "stopped": s}
                               for e, p, t_, s in zip(examples, self.inputs[k][1], texts, stopped)]
        return report

    def write_outputs(self, results, model_dir: str) -> None:
        write_predictions(self.predictions, model_dir)


def format_report(report: dict) -> str:
    lines = [f"  loss {report['loss']:.4f}, perplexity {report['perplexity']:.3f}, next-token accuracy "
             f"{report['token_accuracy']:.4f} over {report['trained_tokens']} completion tokens"]
    if "rougeL" in report:
        lines += [f"  generated for {report['generated_examples']} prompts in "
                  f"{report['generation_seconds']:.1f}s ({report['generated_tokens_per_second']:.1f} "
                  f"tokens/s; mean {report['mean_generated_tokens']:.1f} tokens, "
                  f"{100 * report['stopped_at_eos']:.1f}% ended with EOS)",
                  f"  ROUGE-1 {report['rouge1']:.2f}  ROUGE-2 {report['rouge2']:.2f}  ROUGE-L "
                  f"{report['rougeL']:.2f}  ROUGE-Lsum {report['rougeLsum']:.2f}  BLEU {report['bleu']:.2f}"
                  f"  exact match {report['exact_match']:.4f}"]
    return "\n".join(lines)
