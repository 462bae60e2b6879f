"""metrics.json, built from plain values: no TensorFlow, no model, so its layout and its rates can be
tested without training anything."""

from __future__ import annotations

# metrics.json entries an export carries in its metadata (assets.extra/metadata.json)
EXPORTED_ENTRIES = ("run_name", "task", "backbone", "method", "parameters")


def examples_per_second(steps_trained: int, examples_per_step: float, train_seconds: float) -> float:
    """Training throughput of this process: the examples of the steps it trained over the seconds it
    spent training them.

    Both counts are this process's. A resumed run's earlier processes trained the other steps in
    time this process never measured, so dividing every epoch's examples by this process's seconds
    inflated the rate (a rerun of a finished run trains nothing and reported all epochs' examples
    in ~0 s). 0.0 when this process trained no step.
    """
    if steps_trained <= 0 or train_seconds <= 0:
        return 0.0
    return round(steps_trained * examples_per_step / train_seconds, 2)


def training(state: dict, *, resumed_at_step: int, steps_per_epoch: int, examples_per_step: float,
             global_batch_size: int, replicas: int, workers: int, train_function_traces: int,
             static_shapes: bool, jit_compile: bool, train_seconds: float, tokenize_seconds: float,
             seconds_split: dict, first_call_seconds: float | None, eval_seconds: float,
             class_weights, learning_rate: float, learning_rate_source: str) -> dict:
    """metrics.json's "training" entry from the loop's final `state` (a TrainState or its saved dict:
    step, history and stopped_early are read by key).

    `resumed_at_step` is the step this process started from (0 for a fresh run); the seconds are
    this process's. `examples_per_step`: the global batch, or with packed rows the examples an
    epoch holds over its steps. Rates follow `examples_per_second`: this process's steps only.
    """
    steps_this_process = state["step"] - resumed_at_step
    return {
        "epochs_run": len(state["history"]), "steps": state["step"], "steps_per_epoch": steps_per_epoch,
        "global_batch_size": global_batch_size, "replicas": replicas, "workers": workers,
        "stopped_early": state["stopped_early"], "train_function_traces": train_function_traces,
        "static_shapes": static_shapes, "jit_compile": jit_compile,
        "train_seconds": round(train_seconds, 2), "tokenize_seconds": round(tokenize_seconds, 2),
        # train_seconds split: steps, epoch-end evaluations, checkpoint writes (this process)
        "train_seconds_split": {k: round(v, 2) for k, v in seconds_split.items()},
        "first_call_seconds": first_call_seconds and round(first_call_seconds, 2),
        "eval_seconds": round(eval_seconds, 2), "class_weights": class_weights,
        "learning_rate": learning_rate, "learning_rate_source": learning_rate_source,
        "steps_this_process": steps_this_process,
        "examples_per_second": examples_per_second(steps_this_process, examples_per_step, train_seconds),
        "history": state["history"],
    }


def metrics(*, run_name: str, task: str, backbone: dict, method: dict, adapter_loaded, student, distillation,
            pruning, drift, total_parameters: int, trainable_parameters: int, sequence_length: int,
            description: str, labels: list, data_stats: dict, training: dict, results: dict,
            config: dict) -> dict:
    """The whole metrics.json (before export, quantization and total_seconds are added to it).

    `results`: split name -> the task's report; each becomes a top-level entry ("eval", "test").
    """
    return {
        "run_name": run_name,
        "task": task,
        "backbone": backbone,
        "method": method,
        "adapter_loaded": adapter_loaded,
        "student": student,
        "distillation": distillation,
        "pruning": pruning,
        "drift": drift,
        "parameters": {"total": total_parameters, "trainable": trainable_parameters,
                       "trainable_percent": round(100.0 * trainable_parameters / total_parameters, 4)},
        "sequence_length": sequence_length,
        "data": {"description": description, "labels": labels, **data_stats},
        "training": training,
        **results,
        "config": config,
    }


def headline(results: dict, names) -> dict:
    """Each split's headline metrics (`names`, where the report has them): what exports carry."""
    return {k: {m: report[m] for m in names if m in report} for k, report in results.items()}


def export_metadata(metrics_: dict, description: str, flags: dict, **extra) -> dict:
    """An export's metadata: the run's identity from metrics.json, its data and flags, and `extra`."""
    metadata = {k: metrics_[k] for k in EXPORTED_ENTRIES}
    metadata.update(data=description, flags=flags, **extra)
    return metadata
