"""Text classification: backbone -> pooled text vector -> dropout -> Dense(num_classes, softmax)."""

from __future__ import annotations

import dataclasses
import json
import os
import time

import keras
import numpy as np
import tensorflow as tf
from absl import logging

from kft.models import backbones, encoder_inputs
from kft.data import sources as data_lib
from kft.models import savedmodel as export_lib
from kft.data import inputs
from kft.reporting import metrics
from kft.reporting import plots
from kft.data import split_inputs, token_cache
from kft.training import loop as loop_lib
from kft.config import Config


def _pool(outputs, padding_mask, pooling: str):
    """One vector per text from the backbone's outputs."""
    if isinstance(outputs, dict):
        sequence = outputs.get("sequence_output")
        pooled = outputs.get("pooled_output")
    else:
        sequence, pooled = outputs, None
    if pooling == "auto":
        pooling = "pooled" if pooled is not None else "cls"
    if pooling == "pooled":
        if pooled is None:
            raise ValueError("--pooling=pooled: this backbone has no pooled output; use cls or mean")
        return pooled
    if pooling == "cls":
        return sequence[:, 0, :]
    mask = keras.ops.expand_dims(keras.ops.cast(padding_mask, sequence.dtype), -1)
    return keras.ops.sum(sequence * mask, axis=1) / keras.ops.maximum(keras.ops.sum(mask, axis=1), 1.0)


def build_model(backbone: keras.Model, num_classes: int, dropout: float, pooling: str = "auto",
                seed: int | None = None) -> keras.Model:
    """Functional model taking token_ids and padding_mask ([batch, length] int32)."""
    model_inputs, outputs = encoder_inputs.call_backbone(backbone, uses_pooler=pooling not in ("cls", "mean"))
    pooled = _pool(outputs, model_inputs["padding_mask"], pooling)
    x = keras.layers.Dropout(dropout, seed=seed, name="head_dropout")(pooled)
    # The head computes in float32 so softmax stays accurate under mixed precision.
    probabilities = keras.layers.Dense(num_classes, activation="softmax", dtype="float32",
                                       name="classifier")(x)
    return keras.Model(model_inputs, probabilities, name="text_classifier")


def per_example_loss(labels, probabilities):
    """Cross-entropy of each example ([batch]); the loop weights and sums it."""
    return keras.losses.sparse_categorical_crossentropy(labels, probabilities)


def evaluate(probabilities: np.ndarray, labels: np.ndarray, names: list[str]) -> dict:
    """Accuracy, macro P/R/F1, per-class report and confusion matrix."""
    return metrics.classification_report(labels, probabilities.argmax(-1), names)


def serving_outputs(probabilities: tf.Tensor, names: list[str]) -> dict[str, tf.Tensor]:
    """What the exported signatures return for a batch of class probabilities."""
    class_id = tf.argmax(probabilities, axis=-1, output_type=tf.int32)
    return {"probabilities": probabilities, "class_id": class_id,
            "label": tf.gather(tf.constant(names), class_id)}


# -- data ---------------------------------------------------------------------------------------------

def _split_stats(split: data_lib.Split, encoded: inputs.Encoded, ids: np.ndarray,
                 vocab: data_lib.LabelVocab) -> dict:
    return {
        "source": split.source,
        "examples": len(split),
        "labels": data_lib.label_distribution(ids, vocab),
        "truncated": encoded.truncated,
        "cut_to_max_chars": encoded.cut_chars,
        "mean_tokens": round(float(encoded.lengths.mean()), 2),
        "max_tokens": int(encoded.lengths.max()),
    }


@dataclasses.dataclass
class _Inputs:
    """Every split tokenized once, with its class ids and statistics."""

    sequence_length: int
    splits: dict  # name -> data.Split
    encoded: dict  # name -> inputs.Encoded
    label_ids: dict  # name -> np.ndarray
    stats: dict
    seconds: float


def _prepare_inputs(config: Config, data: data_lib.Data, loaded: backbones.Loaded,
                    model_dir: str, is_chief: bool = True) -> _Inputs:
    """Tokenizes every split once (or reads its ids from the token cache), then packs them."""
    t0 = time.time()
    splits = split_inputs.by_name(data)
    cache_dir, fingerprint = split_inputs.token_cache_site(config, model_dir, loaded.tokenizer)
    pieces, cached = {}, {}
    for k, s in splits.items():
        pieces[k], hit = token_cache.word_pieces(loaded.tokenizer, s.texts, cache_dir, fingerprint,
                                                       write=is_chief)
        cached[k] = "hit" if hit else ("miss" if cache_dir else "off")
    raw_lengths = pieces["train"].row_lengths().numpy()
    sequence_length = config.sequence_length or inputs.choose_sequence_length(
        raw_lengths, loaded.packing, loaded.max_sequence_length)
    inputs.check_lengths(sequence_length, config.serving_sequence_length, loaded.max_sequence_length)
    encoded = {k: inputs.pack_pieces(pieces[k], loaded.packing, sequence_length,
                                     inputs.count_cut(s.texts)) for k, s in splits.items()}
    label_ids = {k: data.vocab.encode(s, config.label_field) for k, s in splits.items()}
    stats = {k: {**_split_stats(splits[k], encoded[k], label_ids[k], data.vocab), "token_cache": cached[k]}
             for k in splits}
    prepared = _Inputs(sequence_length, splits, encoded, label_ids, stats, time.time() - t0)
    logging.info("data: %s; sequence_length=%d (%s); tokenized in %.1fs (token cache: %s)",
                 data.description, sequence_length, split_inputs.length_origin(config), prepared.seconds,
                 ", ".join(f"{k} {v}" for k, v in cached.items()))
    for k, st in stats.items():
        logging.info("  %s: %d examples, labels %s, %d truncated to %d tokens, mean %.1f tokens",
                     k, st["examples"], st["labels"], st["truncated"], sequence_length, st["mean_tokens"])
        if st["cut_to_max_chars"]:
            logging.warning("  %s: %d text(s) longer than %d characters cut before tokenizing", k,
                            st["cut_to_max_chars"], inputs.MAX_TEXT_CHARS)
    return prepared


def _leakage(data: data_lib.Data) -> dict:
    """How many eval/test texts also occur verbatim in train: reported, since it inflates scores."""
    seen = set(data.train.texts)
    out = {}
    for name, split in (("eval", data.eval), ("test", data.test)):
        if split is not None:
            out[name] = sum(1 for t in split.texts if t in seen)
            if out[name]:
                logging.warning("leakage: %d of %d %s texts also appear in the training data",
                                out[name], len(split), name)
    return out




def load_data(config: Config) -> data_lib.Data:
    return data_lib.load(config)


def prepare(config: Config, data: data_lib.Data, loaded: backbones.Loaded, model_dir: str,
            is_chief: bool = True):
    """Tokenizes every split once and returns what the trainer needs (a task_api.Prepared)."""
    from kft.training.task_api import Prepared

    prep = _prepare_inputs(config, data, loaded, model_dir, is_chief)
    vocab, label_ids = data.vocab, prep.label_ids
    class_weight = example_weights = None
    if config.class_weights == "balanced":
        class_weight = data_lib.balanced_class_weights(label_ids["train"], len(vocab))
        example_weights = np.asarray([class_weight[int(y)] for y in label_ids["train"]], np.float32)
        logging.info("class weights: %s", class_weight)
    sources = {k: loop_lib.Feed.from_encoded(prep.encoded[k], label_ids[k], loaded.packing.pad,
                                            example_weights if k == "train" else None)
               for k in prep.splits}

    def epoch_eval(probabilities):
        return {"accuracy": float(np.mean(probabilities.argmax(-1) == label_ids["eval"])),
                "loss": loop_lib.mean_cross_entropy(probabilities, label_ids["eval"])}

    def write_outputs(results, model_dir):
        plots.confusion_matrix(results["eval"]["confusion_matrix"], vocab.names,
                               os.path.join(model_dir, "confusion_matrix.png"), f"eval: {data.eval.source}")
        with tf.io.gfile.GFile(os.path.join(model_dir, "labels.json"), "w") as f:
            json.dump(vocab.to_json(), f, indent=2)

    return Prepared(
        names=vocab.names, sequence_length=prep.sequence_length, sources=sources,
        stats={"leakage": _leakage(data), **prep.stats,
               **({"augmentation": data.augmentation} if data.augmentation else {})}, description=data.description,
        seconds=prep.seconds, train_lengths=prep.encoded["train"].lengths,
        evaluate=lambda k, probabilities, model: evaluate(probabilities, label_ids[k], vocab.names),
        epoch_eval=epoch_eval, format=lambda report: metrics.format_report(report, vocab.names),
        write_outputs=write_outputs, class_weight=class_weight)


def build(backbone: keras.Model, names: list[str], config: Config) -> keras.Model:
    return build_model(backbone, len(names), config.dropout, config.pooling, config.seed)


def loss_function(model: keras.Model, class_weight: dict | None = None):
    return per_example_loss  # class weights are already in the loop's example weights


def export(model, loaded: backbones.Loaded, prep, config: Config, run_name: str, metadata: dict) -> str:
    import sys

    return export_lib.export(model, loaded.tokenizer, loaded.packing, prep.sequence_length,
                             sys.modules["kft.tasks.classification"], prep.names, config.export_dir, run_name,
                             metadata, config.serving_sequence_length or loaded.max_sequence_length)
