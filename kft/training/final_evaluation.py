"""The evaluation after training: every held-out split scored, and what fine-tuning changed
(drift from the starting weights, the sparsity pruning reached)."""

from __future__ import annotations

import time

from absl import logging

from kft.config import Config
from kft.training import drift as drift_lib
from kft.training import progress


def evaluate_splits(loop, prep, model, stop) -> tuple[dict, float]:
    """Reports of every split but "train" (split name -> the task's report) and the seconds taken.

    The eval split reuses the loop's last epoch-end predictions when they are of these weights.
    `stop` (a loop.StopOnSigterm) is told which split a preemption would interrupt.
    """
    t0 = time.time()
    results = {}
    for k, source in prep.sources.items():
        if k == "train":
            continue
        t_split = time.time()
        reuse = k == "eval" and loop.eval_probabilities is not None
        if reuse:
            logging.info("eval: scoring the last epoch-end predictions (the same weights; not recomputed)")
        else:
            stop.phase = f"the final evaluation ({k})"
            logging.info("evaluating %s %s examples ...", f"{len(source.lengths):,}", k)
        outputs = loop.eval_probabilities if reuse else loop.predict(source)
        results[k] = prep.evaluate(k, outputs, model)
        logging.info("%s metrics (%s):\n%s", k, progress.duration(time.time() - t_split),
                     prep.format(results[k]))
    return results, time.time() - t0


def measure_drift(start, loaded, config: Config, model) -> dict | None:
    """With --drift: how far the weights (and representations) moved from `start`."""
    if not config.drift:
        return None
    t0 = time.time()
    info = drift_lib.measure(start, loaded, config, model)
    logging.info("drift from the start (%.1fs): weight distance %.4f overall, per layer %s; linear CKA "
                 "per layer %s%s (general text)", time.time() - t0, info["weights"]["overall"],
                 info["weights"]["per_layer"], (info.get("representations") or {}).get("per_layer"),
                 drift_lib.perplexity_summary(info))
    return info


def pruning_report(pruner, config: Config) -> dict | None:
    """With --prune_sparsity: the sparsity the kernels reached, overall and per layer."""
    info = pruner.report() if pruner is not None else None
    if info:
        logging.info("pruning: %.2f%% of %d projection weights are 0 (target %.2f%%)",
                     100 * info["measured"], info["pruned_parameters"], 100 * config.prune_sparsity)
    return info
