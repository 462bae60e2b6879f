"""What a finished run writes: charts and prediction files, the adapter, the SavedModel export, the
quantized copy (scored and timed beside float32) and metrics.json."""

from __future__ import annotations

import json
import os
import time

import tensorflow as tf
from absl import logging

from kft import methods
from kft.config import Config, to_dict
from kft.models import adapters
from kft.reporting import plots
from kft.training import progress
from kft.training import run_metrics


def write_reports(state: dict, prep, results: dict, drift_info: dict | None, model_dir: str,
                  run_name: str) -> None:
    """The training curves, the task's own outputs (predictions, charts) and the drift chart."""
    plots.training_curves(state["curve_steps"], state["curve_losses"], state["history"],
                          os.path.join(model_dir, "training_curves.png"))
    prep.write_outputs(results, model_dir)
    if drift_info:
        plots.drift(drift_info, os.path.join(model_dir, "drift.png"), run_name)


def save_adapter(model, config: Config, model_dir: str, names: list, source: str) -> dict:
    """The trained tensors of a parameter-efficient method (full fine-tuning: the export is the artifact)."""
    info = adapters.save(model, config, os.path.join(model_dir, adapters.FILENAME), names, source)
    logging.info("adapter: %d trainable tensors (%d parameters, %.1f MB) saved to %s",
                 info["tensors"], info["parameters"], info["bytes"] / 1e6, info["path"])
    return info


def export(a, config: Config, metrics: dict, results: dict, rate: float, run_name: str, stop) -> None:
    """The float32 SavedModel of Assembly `a`; records its path and seconds in `metrics`."""
    metadata = run_metrics.export_metadata(metrics, a.prep.description, to_dict(config), learning_rate=rate,
                                           metrics=run_metrics.headline(results, a.prep.headline))
    t0 = time.time()
    stop.phase = "the export"
    logging.info("exporting SavedModel to %s ...", os.path.join(config.export_dir, run_name))
    methods.prepare_export(a.loaded.backbone, config)
    metrics["export"] = a.task.export(a.model, a.loaded, a.prep, config, run_name, metadata)
    metrics["training"]["export_seconds"] = round(time.time() - t0, 2)
    logging.info("export done in %s: %s", progress.duration(time.time() - t0), metrics["export"])


def quantize(a, config: Config, strategy, float_results: dict, metrics: dict, run_name: str,
             is_chief: bool) -> dict:
    """Quantizes the trained model of Assembly `a`, scores it on the eval split beside float32, and
    exports it as <run_name>_<mode> (the float32 export stays where it was)."""
    from kft.compression import quantization

    t0 = time.time()
    with strategy.scope():
        info = quantization.quantize(a.model, config.quantize)
    a.loop.refresh_predict_function()  # the traced one captured the float32 kernels
    outputs = a.loop.predict(a.prep.sources["eval"])
    quantized = a.prep.evaluate("eval", outputs, a.model)
    headline = [m for m in a.prep.headline if m in quantized]
    info["eval"] = {m: quantized[m] for m in headline}
    info["float32_eval"] = {m: float_results["eval"][m] for m in headline}
    info["seconds"] = round(time.time() - t0, 2)
    logging.info("quantized to %s (%s): weights %.1f MB (float32 %.1f MB); eval %s (float32 %s)",
                 config.quantize, ", ".join(f"{n} {k}" for k, n in info["quantized_layers"].items()),
                 info["weight_bytes"] / 1e6, info["float32_weight_bytes"] / 1e6,
                 ", ".join(f"{m} {info['eval'][m]:.4f}" for m in headline),
                 ", ".join(f"{m} {info['float32_eval'][m]:.4f}" for m in headline))
    if config.export and is_chief:
        _export_quantized(a, config, metrics, run_name, info)
    return info


def _export_quantized(a, config: Config, metrics: dict, run_name: str, info: dict) -> None:
    """Exports the quantized model; with eval texts, times its serving beside the float32 export's."""
    from kft.compression import quantization
    from kft.models import savedmodel as export_lib

    metadata = run_metrics.export_metadata(metrics, a.prep.description, to_dict(config),
                                           quantization=config.quantize, metrics={"eval": info["eval"]})
    info["export"] = a.task.export(a.model, a.loaded, a.prep, config, f"{run_name}_{config.quantize}", metadata)
    info["export_variables_bytes"] = export_lib.variables_bytes(info["export"])
    if metrics.get("export"):
        info["float32_export_variables_bytes"] = export_lib.variables_bytes(metrics["export"])
    logging.info("quantized export: %s (%.1f MB of variables)", info["export"],
                 info["export_variables_bytes"] / 1e6)
    texts = serving_texts(a.data, config)
    if texts and metrics.get("export"):
        info["serving"] = {"float32": quantization.serving_latency(metrics["export"], texts),
                           config.quantize: quantization.serving_latency(info["export"], texts)}
        for name, timing in info["serving"].items():
            logging.info("serving %s export (this process, eval texts): batch 1 p50 %.1f ms, p99 %.1f ms; "
                         "batch 64 %.0f texts/s", name, timing["batch_1_p50_ms"], timing["batch_1_p99_ms"],
                         timing["batch_64_texts_per_second"])


def serving_texts(data, config: Config) -> list[str]:
    """Eval texts as a client sends them (question answering's exports take pairs: not timed here)."""
    if config.task == "classification":
        return list(data.eval.texts[:512])
    if config.task == "token_classification":
        return [" ".join(words) for words in data.eval.words[:512]]
    return []


def write_metrics(metrics: dict, model_dir: str) -> None:
    """metrics.json, renamed into place when complete: never half-written."""
    path = os.path.join(model_dir, "metrics.json")
    with tf.io.gfile.GFile(path + ".tmp", "w") as f:
        json.dump(metrics, f, indent=2, default=str)
    tf.io.gfile.rename(path + ".tmp", path, overwrite=True)
