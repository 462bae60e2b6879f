"""The two recipes `kft.bench` measures kft against, run on kft's data, backbone and flags.

- keras-hub: `TextClassifier.from_preset` with its default preprocessor and `compile`, `fit` on a
  dataset of raw strings, as keras-hub's documentation shows it (every text padded to the
  preprocessor's fixed length, tokenized again every epoch).
- Hugging Face Trainer: the same checkpoint in PyTorch, `DataCollatorWithPadding` (dynamic
  padding), run when `torch` and `transformers` are importable (`pip install -e .[bench]`).

Each returns the same row dictionary as kft's own row: seconds per phase, examples, real token
length sums (for FLOPs), padded positions computed, dev accuracy, peak memory.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import tempfile
import time

import numpy as np

from kft import data as data_lib, perf
from kft.config import Config


def full_fine_tuning_rate(config: Config) -> float:
    """Both baselines fine-tune the whole model: --learning_rate, or kft's default for full."""
    from kft import optim

    return optim.peak_learning_rate(dataclasses.replace(config, method="full", freeze_layers=0))[0]


def _lengths_row(lengths: np.ndarray, epochs: int) -> dict:
    lengths = np.asarray(lengths, np.float64)
    return {"real_tokens": float(lengths.sum()) * epochs,
            "real_tokens_squared": float((lengths ** 2).sum()) * epochs}


def keras_hub_recipe(config: Config, max_steps: int, started: float) -> dict:
    """keras-hub's documented fine-tuning recipe; at most `max_steps` steps (0 = all), then the
    measured per-step time gives the time a full run implies."""
    import keras
    import keras_hub
    import tensorflow as tf

    from kft import backbones, inputs

    keras.utils.set_random_seed(config.seed)
    keras.mixed_precision.set_global_policy(config.precision)  # the precision kft's row runs in
    data = data_lib.load(config)
    location, _ = backbones.resolve(config.backbone)
    classifier = keras_hub.models.TextClassifier.from_preset(location, num_classes=len(data.vocab))
    limit = int(classifier.backbone.max_sequence_length)
    if classifier.preprocessor.sequence_length > limit:  # e.g. a small test backbone: 512 > its positions
        classifier = keras_hub.models.TextClassifier.from_preset(
            location, num_classes=len(data.vocab),
            preprocessor=keras_hub.models.TextClassifierPreprocessor.from_preset(
                location, sequence_length=limit))
    # loss and metrics: keras-hub's defaults
    classifier.compile(optimizer=keras.optimizers.Adam(full_fine_tuning_rate(config)))
    train_y = data.vocab.encode(data.train, config.label_field)
    eval_y = data.vocab.encode(data.eval, config.label_field)
    steps_per_epoch = -(-len(train_y) // config.batch_size)
    full_steps = steps_per_epoch * config.epochs
    steps = min(full_steps, max_steps) if max_steps else full_steps
    epochs = config.epochs if steps == full_steps else 1
    train = tf.data.Dataset.from_tensor_slices((data.train.texts, train_y)).batch(config.batch_size)
    if steps < full_steps:
        train = train.take(steps)
    setup = time.time() - started

    batch_ends = []

    class Times(keras.callbacks.Callback):
        def on_train_batch_end(self, batch, logs=None):
            batch_ends.append(time.time())

    t0 = time.time()
    classifier.fit(train, epochs=epochs, verbose=0, callbacks=[Times()])
    train_seconds = time.time() - t0
    durations = np.diff([t0] + batch_ends)
    implied = train_seconds if steps == full_steps else \
        float(durations[0] + np.mean(durations[1:]) * (full_steps - 1))

    eval_n = len(eval_y) if steps == full_steps else min(len(eval_y), steps * config.batch_size)
    t0 = time.time()
    probabilities = classifier.predict(
        tf.data.Dataset.from_tensor_slices(data.eval.texts[:eval_n]).batch(config.batch_size), verbose=0)
    eval_seconds = (time.time() - t0) * len(eval_y) / eval_n
    accuracy = float(np.mean(probabilities.argmax(-1) == eval_y[:eval_n])) if steps == full_steps else None

    preprocessor = classifier.preprocessor
    width = int(preprocessor.sequence_length)
    # Token counts of the full run (what the implied time is for), as the other rows report them.
    per_text = np.minimum(inputs.raw_token_lengths(preprocessor.tokenizer, data.train.texts) + 2, width)
    return {
        "label": "keras-hub TextClassifier.fit",
        "status": "full" if steps == full_steps else "subset",
        "note": f"{config.precision}; every text padded to {width}; tokenized inside fit, every epoch"
                + ("" if steps == full_steps else
                   f"; ran {steps} of {full_steps} steps, train/eval time implied by the measured rate"),
        "seconds": {"setup": setup, "tokenize": 0.0, "train": implied, "eval": eval_seconds},
        "measured_train_seconds": train_seconds, "steps_run": steps, "steps_full": full_steps,
        "train_examples": len(train_y) * config.epochs,
        **_lengths_row(per_text, config.epochs),
        "padded_tokens": float(len(per_text) * config.epochs * width),
        "dev_accuracy": accuracy,
        "software": {"keras": keras.__version__, "keras_hub": keras_hub.__version__,
                     "tensorflow": tf.__version__},
    }


def hf_precision(precision: str) -> dict:
    """TrainingArguments for kft's --precision (the HF row runs on CPU: bf16 autocast, no fp16)."""
    if precision == "float32":
        return {}
    if precision == "mixed_bfloat16":
        return {"bf16": True}
    raise ValueError(f"--precision={precision}: the Hugging Face row runs on the CPU, where PyTorch has no "
                     "float16 autocast; use float32 or mixed_bfloat16")


def hf_trainer_available() -> bool:
    return all(importlib.util.find_spec(m) is not None for m in ("torch", "transformers", "accelerate"))


def hf_trainer(config: Config, started: float) -> dict:
    """Hugging Face Trainer + DataCollatorWithPadding on the same folder, data and hyperparameters."""
    import torch
    import transformers
    from transformers import (AutoModelForSequenceClassification, AutoTokenizer, DataCollatorWithPadding,
                              Trainer, TrainingArguments)

    from kft import backbones

    precision = hf_precision(config.precision)
    location, kind = backbones.resolve(config.backbone)
    if kind not in ("bundled", "hf_folder"):
        raise ValueError(f"the Hugging Face row needs a Hugging Face folder as --backbone, not {location}")
    transformers.set_seed(config.seed)
    data = data_lib.load(config)
    train_y = data.vocab.encode(data.train, config.label_field)
    eval_y = data.vocab.encode(data.eval, config.label_field)
    tokenizer = AutoTokenizer.from_pretrained(location)
    model = AutoModelForSequenceClassification.from_pretrained(location, num_labels=len(data.vocab))
    rate = perf.torch_matmul_rate()
    setup = time.time() - started

    t0 = time.time()
    train_enc = tokenizer(data.train.texts, truncation=True)
    eval_enc = tokenizer(data.eval.texts, truncation=True)
    tokenize_seconds = time.time() - t0

    def rows(enc, labels):
        keys = list(enc.keys())
        return [{**{k: enc[k][i] for k in keys}, "labels": int(labels[i])} for i in range(len(labels))]

    train_rows, eval_rows = rows(train_enc, train_y), rows(eval_enc, eval_y)
    total_steps = -(-len(train_rows) // config.batch_size) * config.epochs
    with tempfile.TemporaryDirectory() as out:
        args = TrainingArguments(
            output_dir=out, per_device_train_batch_size=config.batch_size,
            per_device_eval_batch_size=config.batch_size, learning_rate=full_fine_tuning_rate(config),
            num_train_epochs=config.epochs, weight_decay=config.weight_decay,
            warmup_steps=int(round(config.warmup_ratio * total_steps)), lr_scheduler_type="linear",
            max_grad_norm=config.clipnorm or 1e9, seed=config.seed, save_strategy="no",
            eval_strategy="no", report_to=[], logging_steps=max(1, total_steps // 10), use_cpu=True,
            disable_tqdm=True, **precision)
        trainer = Trainer(model=model, args=args, train_dataset=train_rows,
                          data_collator=DataCollatorWithPadding(tokenizer))
        t0 = time.time()
        trainer.train()
        train_seconds = time.time() - t0
        t0 = time.time()
        logits = trainer.predict(eval_rows).predictions
        eval_seconds = time.time() - t0
        padded = sum(int(b["input_ids"].numel()) for b in trainer.get_train_dataloader()) * config.epochs
    lengths = np.asarray([len(ids) for ids in train_enc["input_ids"]])
    return {
        "label": "Hugging Face Trainer",
        "status": "full",
        "note": f"{config.precision}; PyTorch, DataCollatorWithPadding (each batch padded to its longest "
                "text)",
        "seconds": {"setup": setup, "tokenize": tokenize_seconds, "train": train_seconds,
                    "eval": eval_seconds},
        "steps_run": total_steps, "steps_full": total_steps,
        "train_examples": len(train_rows) * config.epochs,
        **_lengths_row(lengths, config.epochs),
        "padded_tokens": float(padded),
        "dev_accuracy": float(np.mean(np.asarray(logits).argmax(-1) == eval_y)),
        "torch_matmul_rate": rate,
        "software": {"torch": torch.__version__, "transformers": transformers.__version__,
                     "torch_threads": torch.get_num_threads()},
    }
