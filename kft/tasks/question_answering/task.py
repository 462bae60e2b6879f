"""Extractive question answering (SQuAD): backbone -> Dense(2) start/end logits per position.

Each question is packed with its context into windows (`features.py`); a window that does not hold
the whole answer is labelled with the start token's position, as in the original BERT recipe. The
loss is the mean of the start and end cross-entropies over a window's positions. Evaluation decodes
every window, keeps each question's best span over its windows and scores the answers with SQuAD's
exact match and F1 (`scoring.py`).
"""

from __future__ import annotations

import collections
import dataclasses
import json
import os
import time

import keras
import numpy as np
import tensorflow as tf
from absl import logging
from keras import ops

from kft.models import backbones, encoder_inputs
from kft.data import inputs, split_inputs
from kft.reporting import plots
from kft.training import loop as loop_lib
from kft.config import Config, FlagError
from kft.data.sources import DataError
from kft.tasks.question_answering import data as qa_data, features, scoring

DEFAULT_SEQUENCE_LENGTH = 384  # as the BERT and Hugging Face SQuAD recipes
NEGATIVE = -1e9  # logit of padding positions: never a start or an end


def build_model(backbone: keras.Model, dropout: float, seed: int | None = None) -> keras.Model:
    """Functional model: token_ids, padding_mask [batch, length] -> logits [batch, length, 2]
    (start, end; padding positions at -1e9). Segment ids, where the backbone takes them, are 0 up
    to the first end token (the question) and 1 after it (the context), computed from the ids: a
    window's last real token is the end token."""
    model_inputs, outputs = encoder_inputs.call_backbone(backbone, segment_ids=_question_then_context)
    x = keras.layers.Dropout(dropout, seed=seed, name="head_dropout")(encoder_inputs.sequence_output(outputs))
    logits = keras.layers.Dense(2, dtype="float32", name="span_logits")(x)
    keep = ops.expand_dims(ops.cast(model_inputs["padding_mask"], "float32"), -1)
    logits = logits * keep + (1.0 - keep) * NEGATIVE
    return keras.Model(model_inputs, logits, name="span_extractor")


def _question_then_context(token_ids, padding_mask):
    """Segment ids: 0 up to the first end token (the question), 1 after it (the context)."""
    last = ops.maximum(ops.sum(padding_mask, axis=1) - 1, 0)
    end_id = ops.take_along_axis(token_ids, ops.expand_dims(last, 1), axis=1)
    is_end = ops.cast(ops.equal(token_ids, end_id), "int32")
    return ops.minimum(ops.cumsum(is_end, axis=1) - is_end, 1)


def loss_function(model: keras.Model, class_weight: dict | None = None):
    """fn(labels [batch, 2] start/end positions, logits [batch, length, 2]) -> loss per window."""

    def span_loss(labels, logits):
        labels = ops.cast(labels, "int32")
        start = keras.losses.sparse_categorical_crossentropy(labels[:, 0], logits[:, :, 0], from_logits=True)
        end = keras.losses.sparse_categorical_crossentropy(labels[:, 1], logits[:, :, 1], from_logits=True)
        return (start + end) / 2.0

    return span_loss


# -- data ---------------------------------------------------------------------------------------------

@dataclasses.dataclass
class QAData:
    train: qa_data.Questions
    eval: qa_data.Questions
    test: qa_data.Questions | None
    description: str


def load_data(config: Config) -> QAData:
    """Reads and validates the splits (errors name the file and the question id)."""
    if config.dataset:
        eval_split = config.eval_split or "validation"
        train = qa_data.read_tfds(config.dataset, config.train_split, config.data_dir)
        eval_ = qa_data.read_tfds(config.dataset, eval_split, config.data_dir)
        test, description = None, f"tfds:{config.dataset} ({config.train_split} / {eval_split})"
    elif config.train_file:
        fix = config.fix_answer_offsets
        train = qa_data.read_file(config.train_file, "train", "--train_file", fix)
        eval_ = qa_data.read_file(config.eval_file, "eval", "--eval_file", fix) if config.eval_file else None
        test = qa_data.read_file(config.test_file, "test", "--test_file", fix) if config.test_file else None
        description = config.train_file
    else:
        raise DataError("no training data: give --train_file (SQuAD JSON or JSONL) or --dataset=squad")
    train = dataclasses.replace(train, name="train").head(config.max_train_examples)
    if eval_ is None:  # hold out whole contexts, so no eval question reads a context trained on
        contexts = sorted({q.context for q in train.items})
        chosen = split_inputs.held_out(len(contexts), config, (
            f"{train.source}: {len(contexts)} distinct context(s); --validation_fraction="
            f"{config.validation_fraction:g} holds out whole contexts and needs at least 2. "
            "Give --eval_file or more data"))
        held = {contexts[i] for i in chosen}
        eval_ = dataclasses.replace(train, name="eval", items=[q for q in train.items if q.context in held])
        train = dataclasses.replace(train, items=[q for q in train.items if q.context not in held])
        description += f" (eval = {len(chosen)} of {len(contexts)} train contexts)"
    eval_ = dataclasses.replace(eval_, name="eval").head(config.max_eval_examples)
    return QAData(train, eval_, test, description)


@dataclasses.dataclass
class Encoded:
    """One split's windows and what decoding needs to map them back to characters."""

    questions: qa_data.Questions
    ids: list[np.ndarray]
    labels: np.ndarray  # [windows, 2]
    example: np.ndarray  # [windows] question index
    first_piece: np.ndarray
    offset: np.ndarray
    context_length: np.ndarray
    char_start: list[np.ndarray]  # per question: its context pieces' character spans
    char_end: list[np.ndarray]
    stats: dict

    @property
    def lengths(self) -> np.ndarray:
        return split_inputs.row_lengths(self.ids)


def encode(questions: qa_data.Questions, tokenizer, packing: backbones.Packing, sequence_length: int,
           max_query_length: int, doc_stride: int) -> Encoded:
    """Tokenizes each distinct context and each question once, packs windows and labels them."""
    tokenize = inputs._graph_tokenizer(tokenizer)
    lengths = tf.constant(features.piece_lengths(tokenizer.get_vocabulary()))
    unknown = int(tokenizer.token_to_id(getattr(tokenizer, "oov_token", None) or "[UNK]"))
    items = questions.items
    distinct = list(dict.fromkeys(q.context for q in items))
    index = {c: i for i, c in enumerate(distinct)}
    ids, starts, ends = [], [], []
    for i in range(0, len(distinct), 256):
        p, s, e = features.context_pieces(tokenize, tf.constant(distinct[i:i + 256]), lengths, unknown)
        ids.append(p), starts.append(s), ends.append(e)
    if not ids:
        raise DataError(f"{questions.source}: no questions in the {questions.name} split")
    ctx_ids, ctx_start, ctx_end = (tf.concat(x, axis=0) for x in (ids, starts, ends))
    which = tf.constant([index[q.context] for q in items], tf.int32)
    context = tf.gather(ctx_ids, which)
    question = inputs.word_pieces(tokenizer, [q.question for q in items])
    w = features.windows(question, context, packing, sequence_length, max_query_length, doc_stride)
    example, first, offset, length = (x.numpy() for x in (w.example, w.first_piece, w.offset,
                                                            w.context_length))
    starts_np = ctx_start.to_list()
    ends_np = ctx_end.to_list()
    char_start = [np.asarray(starts_np[index[q.context]], np.int64) for q in items]
    char_end = [np.asarray(ends_np[index[q.context]], np.int64) for q in items]
    labels = np.zeros((len(example), 2), np.int32)
    unreachable = inexact = 0
    for qi, q in enumerate(items):
        span, exact = None, True
        if q.answers:
            text, at = q.answers[0]  # train on the first answer (SQuAD train has one per question)
            span, exact = features.answer_span(char_start[qi], char_end[qi], at, at + len(text))
            inexact += int(span is not None and not exact)
        found = False
        for wi in np.flatnonzero(example == qi):
            labels[wi] = features.window_labels(span, int(first[wi]), int(offset[wi]), int(length[wi]))
            found = found or labels[wi, 0] > 0
        unreachable += int(span is not None and not found)
    windows_per = np.bincount(example, minlength=len(items))
    stats = {"source": questions.source, "questions": len(items), "contexts": len(distinct),
             "windows": int(len(example)), "max_windows_per_question": int(windows_per.max()),
             "questions_in_several_windows": int((windows_per > 1).sum()),
             "questions_cut": int((w.question_cut.numpy() > 0).sum()),
             "unanswerable": questions.unanswerable, "answer_offsets_repaired": questions.repaired,
             "answers_in_no_window": unreachable, "answers_inside_a_word": inexact}
    window_ids = [np.asarray(x, np.int32) for x in w.ids.to_list()]
    return Encoded(questions, window_ids, labels, example, first, offset, length, char_start, char_end, stats)


def decode(enc: Encoded, logits: np.ndarray, n_best: int, max_answer_length: int, null_answers: bool,
           null_score_threshold: float) -> dict:
    """Question id -> {"text", "start", "end", "score"} from the windows' logits [windows, length, 2]."""
    score, start, end, null = features.best_spans(logits, enc.offset, enc.context_length, n_best,
                                                  max_answer_length)
    out = {}
    order = collections.defaultdict(list)
    for wi, qi in enumerate(enc.example):
        order[int(qi)].append(wi)
    for qi, q in enumerate(enc.questions.items):
        wins = order[qi]
        best = max(wins, key=lambda wi: (score[wi], -wi))  # the first window among equal scores
        null_score = min(null[wi] for wi in wins)
        if not np.isfinite(score[best]) or (null_answers and null_score > score[best] + null_score_threshold):
            out[q.id] = {"text": "", "start": 0, "end": 0, "score": float(score[best])}
            continue
        s = int(start[best] - enc.offset[best] + enc.first_piece[best])
        e = int(end[best] - enc.offset[best] + enc.first_piece[best])
        c0, c1 = int(enc.char_start[qi][s]), int(enc.char_end[qi][e])
        out[q.id] = {"text": q.context[c0:c1], "start": c0, "end": c1, "score": float(score[best])}
    return out


def sequence_length_for(config: Config, loaded: backbones.Loaded) -> int:
    length = config.sequence_length or min(DEFAULT_SEQUENCE_LENGTH, loaded.max_sequence_length)
    if length > loaded.max_sequence_length:
        raise FlagError(f"--sequence_length={length} exceeds the backbone's limit of "
                        f"{loaded.max_sequence_length} positions")
    problem = features.check_windows(length, config.max_query_length, config.doc_stride, loaded.packing)
    if problem:
        raise FlagError(problem)
    return length


def prepare(config: Config, data: QAData, loaded: backbones.Loaded, model_dir: str, is_chief: bool = True):
    """Windows once per split; returns a task_api.Prepared."""
    from kft.training.task_api import Prepared

    t0 = time.time()
    length = sequence_length_for(config, loaded)
    splits = split_inputs.by_name(data)
    encoded = {k: encode(q, loaded.tokenizer, loaded.packing, length, config.max_query_length,
                         config.doc_stride) for k, q in splits.items()}
    null_answers = data.train.unanswerable > 0
    sources, stats = {}, {}
    for k, enc in encoded.items():
        lengths = enc.lengths
        matrix = split_inputs.padded(enc.ids, loaded.packing.pad)
        sources[k] = loop_lib.Feed(tf.constant(matrix), lengths, enc.labels, np.ones(len(lengths), np.float32))
        stats[k] = {**enc.stats, "mean_tokens": round(float(lengths.mean()), 2), "max_tokens": int(lengths.max())}
        logging.info("  %s: %d questions over %d contexts -> %d windows (%d questions in several windows; "
                     "%d questions cut to --max_query_length=%d; %d answers in no window whole; %d answers "
                     "start or end inside a word piece's unit; %d unanswerable; %d answer offsets repaired)",
                     k, stats[k]["questions"], stats[k]["contexts"], stats[k]["windows"],
                     stats[k]["questions_in_several_windows"], stats[k]["questions_cut"],
                     config.max_query_length, stats[k]["answers_in_no_window"],
                     stats[k]["answers_inside_a_word"], stats[k]["unanswerable"],
                     stats[k]["answer_offsets_repaired"])
    seconds = time.time() - t0
    logging.info("data: %s; windows of %d positions, --doc_stride=%d; %s; tokenized in %.1fs",
                 data.description, length, config.doc_stride,
                 "unanswerable questions present: null answers enabled" if null_answers else "every question "
                 "answerable (SQuAD 1.1 style)", seconds)
    answers = {}

    def evaluate(k, outputs, model):
        enc = encoded[k]
        found = decode(enc, outputs, config.n_best, config.max_answer_length, null_answers,
                       config.null_score_threshold)
        answers[k] = found
        report = scoring.report({i: a["text"] for i, a in found.items()}, enc.questions)
        loss = ops.convert_to_numpy(loss_function(None)(sources[k].labels, outputs))
        report["loss"] = float(loss.mean())
        report["by_context_length"] = f1_by_context_length(enc.questions, found)
        return report

    def epoch_eval(outputs):
        report = evaluate("eval", outputs, None)
        return {"accuracy": report["exact_match"] / 100.0, "loss": report["loss"], "score": report["f1"],
                "f1": report["f1"]}

    def write_outputs(results, model_dir):
        for k, found in answers.items():  # predictions.json as SQuAD's evaluation reads it; spans too
            suffix = "" if k == "eval" else f"_{k}"
            with tf.io.gfile.GFile(os.path.join(model_dir, f"predictions{suffix}.json"), "w") as f:
                json.dump({i: a["text"] for i, a in found.items()}, f, indent=1, ensure_ascii=False)
            with tf.io.gfile.GFile(os.path.join(model_dir, f"answers{suffix}.jsonl"), "w") as f:
                f.write("".join(json.dumps({"id": i, **a}, ensure_ascii=False) + "\n" for i, a in found.items()))
        plots.f1_by_context_length(results["eval"]["by_context_length"],
                                   os.path.join(model_dir, "f1_by_context_length.png"),
                                   f"eval: {data.eval.source}")

    return Prepared(names=["start", "end"], sequence_length=length, sources=sources, stats=stats,
                    description=data.description, seconds=seconds, train_lengths=sources["train"].lengths,
                    evaluate=evaluate, epoch_eval=epoch_eval, format=format_report, write_outputs=write_outputs,
                    headline=("f1", "exact_match"))


def f1_by_context_length(questions: qa_data.Questions, found: dict, bins: int = 5) -> list[dict]:
    """F1 and EM per context-length bin (words; bins of about equal question counts)."""
    words = np.array([len(q.context.split()) for q in questions.items])
    if not len(words):
        return []
    edges = np.unique(np.quantile(words, np.linspace(0, 1, bins + 1)).astype(int))
    out = []
    for lo, hi in zip(edges[:-1], edges[1:]):
        last = hi == edges[-1]
        chosen = [q for q, n in zip(questions.items, words) if lo <= n and (n <= hi if last else n < hi)]
        if not chosen:
            continue
        refs = [[t for t, _ in q.answers] for q in chosen]
        preds = [found[q.id]["text"] for q in chosen]
        out.append({"words_from": int(lo), "words_to": int(hi), "questions": len(chosen),
                    "f1": 100.0 * float(np.mean([scoring.f1(p, r) for p, r in zip(preds, refs)])),
                    "exact_match": 100.0 * float(np.mean([scoring.exact_match(p, r)
                                                          for p, r in zip(preds, refs)]))})
    return out


def format_report(report: dict) -> str:
    lines = [f"exact match {report['exact_match']:.2f}  F1 {report['f1']:.2f}  over {report['questions']} "
             f"questions ({report['answered']} answered); loss {report['loss']:.4f}"]
    if "has_ans_f1" in report:
        lines.append(f"  answerable: EM {report['has_ans_exact_match']:.2f} F1 {report['has_ans_f1']:.2f} "
                     f"({report['has_ans_questions']}); unanswerable: EM {report['no_ans_exact_match']:.2f} "
                     f"({report['no_ans_questions']})")
    for row in report.get("by_context_length", []):
        lines.append(f"  contexts of {row['words_from']}-{row['words_to']} words: F1 {row['f1']:.2f} "
                     f"({row['questions']} questions)")
    return "\n".join(lines)


def build(backbone: keras.Model, names: list[str], config: Config) -> keras.Model:
    return build_model(backbone, config.dropout, config.seed)


def load_backbone(config: Config) -> backbones.Loaded:
    loaded = backbones.load(config.backbone)
    if not loaded.packing.start or not loaded.packing.end:
        raise FlagError(f"--backbone={config.backbone}: question answering packs [start] question [end] "
                        "context [end]; this tokenizer has no start or end token")
    return loaded


def export(model, loaded: backbones.Loaded, prep, config: Config, run_name: str, metadata: dict) -> str:
    """SavedModel whose `serving_default` answers (question, context) pairs (see serving.py)."""
    from kft.models import savedmodel as export_lib
    from kft.tasks.question_answering import serving

    null_answers = prep.stats["train"]["unanswerable"] > 0
    endpoints = serving.endpoints(model, loaded, prep.sequence_length, config, null_answers)
    return export_lib.write(model, loaded.tokenizer, endpoints, prep.names, config.export_dir, run_name,
                            {**metadata, "sequence_length": prep.sequence_length,
                             "doc_stride": config.doc_stride, "max_query_length": config.max_query_length,
                             "n_best": config.n_best, "max_answer_length": config.max_answer_length,
                             "null_answers": null_answers,
                             "null_score_threshold": config.null_score_threshold})
