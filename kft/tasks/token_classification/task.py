"""Token classification (NER): backbone -> per-token Dense(num_tags) -> softmax, or a linear-chain CRF.

Labels live on word pieces: a word's first piece holds its tag id and every other position holds -1
(`kft.data.split_inputs.IGNORE`), which loss and metrics skip. The softmax head's loss is the
cross-entropy averaged over the batch's tagged positions. With a CRF the tagged positions are first
gathered into a left-aligned word sequence (the CRF models transitions between words, not pieces)
and the loss is the CRF's negative log-likelihood, also divided by the batch's tagged words.
"""

from __future__ import annotations

import dataclasses
import json
import os
import time

import keras
import numpy as np
import tensorflow as tf
from absl import logging
from keras import ops

from kft.data import augment
from kft.models import backbones, encoder_inputs
from kft.data import inputs, split_inputs
from kft.reporting import metrics
from kft.reporting import plots
from kft.tasks.token_classification import crf as crf_lib, data as token_data, inputs as token_inputs
from kft.training import loop as loop_lib
from kft.config import Config, FlagError
from kft.data.sources import DataError
from kft.data.split_inputs import IGNORE


def build_model(backbone: keras.Model, num_tags: int, dropout: float, use_crf: bool = False,
                tags: list[str] | None = None, seed: int | None = None) -> keras.Model:
    """Functional model: token_ids, padding_mask [batch, length] -> per-position tag probabilities
    (softmax head) or tag scores (CRF head; the CRF layer holds the transitions)."""
    model_inputs, outputs = encoder_inputs.call_backbone(backbone)
    x = keras.layers.Dropout(dropout, seed=seed, name="head_dropout")(encoder_inputs.sequence_output(outputs))
    scores = keras.layers.Dense(num_tags, dtype="float32", name="tagger")(x)
    if use_crf:
        allowed, allowed_start = crf_lib.iob2_constraints(tags) if tags else (None, None)
        out = crf_lib.CRF(num_tags, allowed, allowed_start, name="crf")(scores)
    else:
        out = keras.layers.Softmax(dtype="float32", name="tag_probabilities")(scores)
    return keras.Model(model_inputs, out, name="token_classifier")


def crf_layer(model: keras.Model):
    """The model's CRF layer, or None for a softmax head."""
    return next((layer for layer in model.layers if isinstance(layer, crf_lib.CRF)), None)


def gather_words(values, labels):
    """Moves the tagged positions (labels >= 0) of each row to the front, in order.

    Returns (values [batch, time, ...] reordered, labels reordered with -1 -> 0, word mask
    [batch, time]): the left-aligned word sequences a CRF works on.
    """
    tagged = labels >= 0
    time = ops.shape(labels)[1]
    position = ops.arange(time)[None, :]
    order = ops.argsort(ops.where(tagged, position, position + time), axis=1)
    index = order[..., None] if len(values.shape) == 3 else order
    moved = ops.take_along_axis(values, index, axis=1)
    words = ops.sum(ops.cast(tagged, "int32"), axis=1)
    mask = ops.cast(position < words[:, None], "int32")
    word_labels = ops.maximum(ops.take_along_axis(labels, order, axis=1), 0) * mask
    return moved, word_labels, mask


def loss_function(model: keras.Model, class_weight: dict | None = None):
    """fn(labels [batch, time], outputs [batch, time, tags]) -> loss summed over each example's
    tagged positions [batch]; the loop divides by the batch's tagged positions (a per-word mean, as
    the usual token-classification recipes compute it).

    `class_weight` ({tag id: weight}, softmax head only) scales each tagged position's loss.
    """
    crf = crf_layer(model)
    weights = None
    if class_weight:
        weights = np.array([class_weight[i] for i in range(len(class_weight))], np.float32)

    def softmax_loss(labels, probabilities):
        labels = ops.cast(labels, "int32")
        tagged = ops.cast(labels >= 0, "float32")
        ce = keras.losses.sparse_categorical_crossentropy(ops.maximum(labels, 0), probabilities)
        if weights is not None:
            ce = ce * ops.take(ops.convert_to_tensor(weights), ops.maximum(labels, 0))
        return ops.sum(ce * tagged, axis=1)

    def crf_loss(labels, scores):
        labels = ops.cast(labels, "int32")
        emissions, word_labels, mask = gather_words(scores, labels)
        return crf.negative_log_likelihood(emissions, word_labels, mask)

    return crf_loss if crf is not None else softmax_loss


def predict_words(model: keras.Model, outputs: np.ndarray, labels: np.ndarray) -> list[np.ndarray]:
    """Tag ids of the tagged positions of each row ([rows, time, tags] model outputs; `labels`
    marks the positions to read, >= 0): argmax for softmax, Viterbi for a CRF."""
    crf = crf_layer(model)
    if crf is None:
        best = outputs.argmax(-1)
        return [best[i][labels[i] >= 0] for i in range(len(outputs))]
    emissions, _, mask = gather_words(ops.convert_to_tensor(outputs), ops.convert_to_tensor(labels))
    tags = ops.convert_to_numpy(crf.decode(emissions, mask)[0])
    counts = (labels >= 0).sum(axis=1)
    return [tags[i, :counts[i]] for i in range(len(outputs))]


# -- data ---------------------------------------------------------------------------------------------

TFDS_EVAL_SPLIT = {"conll2003": "dev"}


@dataclasses.dataclass
class TokenData:
    train: token_data.Sentences
    eval: token_data.Sentences
    test: token_data.Sentences | None
    vocab: token_data.TagVocab
    description: str
    augmentation: dict | None = None  # what --augment added to train (metrics.json)


def load_data(config: Config) -> TokenData:
    """Reads and validates the splits; the tag vocabulary comes from train."""
    if config.pooling != "auto":
        raise FlagError(f"--pooling={config.pooling} applies to --task=classification; a token head reads "
                        "every position")
    if config.class_weights != "none" and config.crf:
        raise FlagError("--class_weights=balanced weights per-token losses; with --crf the loss is one "
                        "sequence likelihood, so it does not apply")
    if config.dataset:
        eval_split = config.eval_split or TFDS_EVAL_SPLIT.get(config.dataset, "validation")
        train = token_data.read_tfds(config.dataset, config.train_split, config.data_dir)
        eval_ = token_data.read_tfds(config.dataset, eval_split, config.data_dir)
        test, description = None, f"tfds:{config.dataset} ({config.train_split} / {eval_split})"
    elif config.train_file:
        train = token_data.read_file(config.train_file, "train", config.tag_column, "--train_file")
        eval_ = (token_data.read_file(config.eval_file, "eval", config.tag_column, "--eval_file")
                 if config.eval_file else None)
        test = (token_data.read_file(config.test_file, "test", config.tag_column, "--test_file")
                if config.test_file else None)
        description = config.train_file
    else:
        raise DataError("no training data: give --train_file (CoNLL or JSONL) or --dataset=conll2003")
    train = train.head(config.max_train_examples)
    if eval_ is None:
        held = set(split_inputs.held_out(len(train), config, (
            f"{train.source}: {len(train)} sentence(s); --validation_fraction="
            f"{config.validation_fraction:g} needs at least 2 to hold one out for evaluation. "
            "Give --eval_file or more sentences")).tolist())
        keep = [i for i in range(len(train)) if i not in held]
        order = sorted(held)
        eval_ = token_data.Sentences("eval", train.source, [train.words[i] for i in order],
                                     [train.tags[i] for i in order], [train.lines[i] for i in order],
                                     train.one_word_per_line)
        train = token_data.Sentences("train", train.source, [train.words[i] for i in keep],
                                     [train.tags[i] for i in keep], [train.lines[i] for i in keep],
                                     train.one_word_per_line)
        description += f" (eval = {config.validation_fraction:.0%} of train sentences)"
    eval_ = eval_.head(config.max_eval_examples)
    augmentation = None
    augment.check_flags(config)
    if config.augment != "none":  # after eval is set aside: copies are train only
        sources, words, tags, report = augment.sentences(config, train.words, train.tags)
        # a copy keeps its source sentence's first line (its words no longer sit one per line)
        train = token_data.Sentences(train.name, train.source, train.words + words, train.tags + tags,
                                     train.lines + [train.lines[i] for i in sources], train.one_word_per_line)
        augmentation = report.to_json()
        description += f" (+{augmentation['added']} {config.augment} copies)"
    vocab = token_data.TagVocab.from_sentences(train)
    for split in (eval_, test):
        if split is not None:
            vocab.encode(split)  # an unseen tag fails here, before any training
    return TokenData(train, eval_, test, vocab, description, augmentation)


def prepare(config: Config, data: TokenData, loaded: backbones.Loaded, model_dir: str,
            is_chief: bool = True):
    """Word pieces once per split, windows, per-position labels; returns a task_api.Prepared."""
    from kft.training.task_api import Prepared

    t0 = time.time()
    splits = split_inputs.by_name(data)
    pieces, empty = {}, {}
    for k, split in splits.items():
        pieces[k], empty[k] = token_inputs.sentence_pieces(loaded.tokenizer, split.words)
    sequence_length = _sequence_length(config, loaded, pieces["train"])
    names = data.vocab.names
    tag_ids = {k: data.vocab.encode(split) for k, split in splits.items()}
    class_weight = _tag_weights(config, tag_ids["train"], names)
    windows = {k: token_inputs.encode(pieces[k], tag_ids[k], loaded.packing, sequence_length, config.stride,
                                      empty[k]) for k in splits}
    sources, stats = _feeds(windows, splits, loaded.packing.pad)
    seconds = time.time() - t0
    logging.info("data: %s; %d tags %s; sequence_length=%d (%s); word pieces in %.1fs", data.description,
                 len(names), names, sequence_length, split_inputs.length_origin(config), seconds)
    if data.augmentation:
        stats["augmentation"] = data.augmentation
    scorer = _EntityEval(data, splits, sources, windows, class_weight)
    scorer.prep = Prepared(names=names, sequence_length=sequence_length, sources=sources, stats=stats,
                           description=data.description, seconds=seconds,
                           train_lengths=windows["train"].lengths, evaluate=scorer.evaluate,
                           epoch_eval=scorer.epoch_eval, format=format_report,
                           write_outputs=scorer.write_outputs,
                           headline=("entity_f1", "entity_precision", "entity_recall", "token_accuracy"),
                           class_weight=class_weight)
    return scorer.prep


def _sequence_length(config: Config, loaded: backbones.Loaded, train_pieces) -> int:
    """--sequence_length or the 99th percentile of train's sentences in pieces, checked against the
    backbone and the room a window needs for word pieces."""
    specials = len(loaded.packing.start) + len(loaded.packing.end)
    totals = np.array([sum(len(p) for p in sentence) for sentence in train_pieces])
    sequence_length = config.sequence_length or inputs.choose_sequence_length(
        totals, loaded.packing, loaded.max_sequence_length)
    inputs.check_lengths(sequence_length, config.serving_sequence_length, loaded.max_sequence_length)
    if sequence_length - specials < 2:
        raise FlagError(f"--sequence_length={sequence_length} leaves no room for word pieces")
    return sequence_length


def _tag_weights(config: Config, train_tag_ids, names: list[str]) -> dict | None:
    """--class_weights=balanced: n / (k * count) over the training words' tags; otherwise None."""
    if config.class_weights != "balanced":
        return None
    from kft.data.sources import balanced_class_weights

    class_weight = balanced_class_weights(np.concatenate([np.asarray(t) for t in train_tag_ids]), len(names))
    logging.info("tag weights: %s", {names[i]: round(w, 3) for i, w in class_weight.items()})
    return class_weight


def _feeds(windows: dict, splits: dict, pad: int) -> tuple[dict, dict]:
    """(split name -> the loop's feed, split name -> statistics for metrics.json) of the windows."""
    sources, stats = {}, {}
    for k, w in windows.items():
        lengths = w.lengths
        matrix = split_inputs.padded(w.ids, pad)
        labels = split_inputs.padded(w.labels, IGNORE)
        # the loss averages over the global batch's tagged words, not over its sentences
        sources[k] = loop_lib.Feed(tf.constant(matrix), lengths, labels, np.ones(len(lengths), np.float32),
                                   (labels >= 0).sum(axis=1))
        violations = token_data.iob2_violations(splits[k])
        stats[k] = {"source": splits[k].source, "sentences": len(splits[k]),
                    "words": int(sum(len(s) for s in splits[k].words)), "windows": len(lengths),
                    "split_sentences": w.split_sentences, "cut_words": w.cut_words,
                    "empty_words": w.empty_words,
                    "iob2_violations": violations, "mean_tokens": round(float(lengths.mean()), 2),
                    "max_tokens": int(lengths.max())}
        logging.info("  %s: %d sentences, %d words -> %d windows (%d sentences split into windows, %d words "
                     "cut, %d words without pieces); %d ill-formed IOB2 tags %s", k, len(splits[k]),
                     stats[k]["words"], len(lengths), w.split_sentences, w.cut_words, w.empty_words,
                     violations["count"], violations["examples"][:3])
    return sources, stats


@dataclasses.dataclass
class _EntityEval:
    """The evaluate / epoch_eval / write_outputs of the task's Prepared: each word's predicted tag
    (read from its window) scored by entity."""

    data: TokenData
    splits: dict  # name -> token_data.Sentences
    sources: dict  # name -> the loop's feed
    windows: dict  # name -> token_inputs.Windows
    class_weight: dict | None
    prep: object = None  # the Prepared: the trainer sets its model, whose head the epoch-end loss reads

    def word_tags(self, k, outputs, model):
        """Predicted tag names per sentence of split k."""
        labels = self.sources[k].labels
        per_window = predict_words(model, outputs, labels)
        rank = np.cumsum(labels >= 0, axis=1) - 1  # position -> index among the window's tagged ones
        by_position = [per_window[w][rank[w]] if len(per_window[w]) else np.zeros(0, np.int64)
                       for w in range(len(per_window))]
        ids = token_inputs.word_predictions(self.windows[k], by_position)
        return [[self.data.vocab.names[int(i)] for i in sentence] for sentence in ids]

    def evaluate(self, k, outputs, model):
        return metrics.entity_report(self.splits[k].tags, self.word_tags(k, outputs, model))

    def epoch_eval(self, outputs):
        model, labels = self.prep.model, self.sources["eval"].labels
        report = self.evaluate("eval", outputs, model)
        loss = ops.convert_to_numpy(loss_function(model, self.class_weight)(labels, outputs))
        per_word = float(loss.sum() / max(1, int((labels >= 0).sum())))
        # the best epoch (and a search's pruning) goes by entity F1, the task's headline score
        return {"accuracy": report["token_accuracy"], "loss": per_word,
                "entity_f1": report["entity_f1"], "score": report["entity_f1"]}

    def write_outputs(self, results, model_dir):
        plots.per_type_scores(results["eval"]["per_type"], os.path.join(model_dir, "entity_scores.png"),
                              f"eval: {self.data.eval.source}")
        with tf.io.gfile.GFile(os.path.join(model_dir, "labels.json"), "w") as f:
            json.dump({"tags": self.data.vocab.names}, f, indent=2)


def format_report(report: dict) -> str:
    lines = [f"{'type':<8}  precision  recall     f1  support"]
    for kind, c in report["per_type"].items():
        lines.append(f"{kind:<8}  {c['precision']:9.4f}  {c['recall']:6.4f}  {c['f1']:.4f}  "
                     f"{c['support']:7d}")
    lines.append(f"{'micro':<8}  {report['entity_precision']:9.4f}  {report['entity_recall']:6.4f}  "
                 f"{report['entity_f1']:.4f}  {report['entities']:7d}")
    lines.append(f"token accuracy {report['token_accuracy']:.4f} over {report['words']} words")
    return "\n".join(lines)


def build(backbone: keras.Model, names: list[str], config: Config) -> keras.Model:
    return build_model(backbone, len(names), config.dropout, config.crf, names, config.seed)


def export(model, loaded: backbones.Loaded, prep, config: Config, run_name: str, metadata: dict) -> str:
    """SavedModel with `serving_default` (raw texts) and `serve_words` (pre-split words), both
    returning words, tags, tag scores and entities (see serving.py in this package)."""
    import tensorflow_text as tf_text

    from kft.models import savedmodel as export_lib
    from kft.tasks.token_classification import serving as token_serving

    crf = crf_layer(model)
    unknown = token_inputs._unknown_id(loaded.tokenizer)
    whitespace = tf_text.WhitespaceTokenizer()
    serving_length = config.serving_sequence_length or loaded.max_sequence_length

    def tag(words, start, end):
        return token_serving.tag_words(model, crf, loaded.tokenizer, loaded.packing,
                                       serving_length, prep.names, unknown, words, start, end)

    def serve_text(text):
        words, byte_start, byte_end = whitespace.tokenize_with_offsets(text)
        start, end = inputs.char_offsets(text, byte_start, byte_end)
        return tag(words, start, end)

    def serve_words(words):
        words = tf.RaggedTensor.from_tensor(words, padding="")
        start, end = token_serving.joined_offsets(words)
        return tag(words, start, end)

    endpoints = {"serving_default": (serve_text, [tf.TensorSpec([None], tf.string, name="text")]),
                 "serve_words": (serve_words, [tf.TensorSpec([None, None], tf.string, name="words")])}
    return export_lib.write(model, loaded.tokenizer, endpoints, prep.names, config.export_dir, run_name,
                            {**metadata, "sequence_length": prep.sequence_length,
                             "serving_sequence_length": serving_length})
