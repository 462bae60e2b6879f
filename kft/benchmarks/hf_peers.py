"""The recipes `kft.bench` measures kft against, run on kft's data, backbone and flags.

- keras-hub: `TextClassifier.from_preset` with its default preprocessor and `compile`, `fit` on a
  dataset of raw strings, as keras-hub's documentation shows it (every text padded to the
  preprocessor's fixed length, tokenized again every epoch).
- Hugging Face Trainer: the same checkpoint in PyTorch, `DataCollatorWithPadding` (dynamic
  padding), run when `torch` and `transformers` are importable (`pip install -e .[bench]`).
- For --task=question_answering, the Hugging Face `run_qa` recipe instead:
  `AutoModelForQuestionAnswering` + Trainer on windows padded to --sequence_length (384), n-best
  span decoding, scored by kft's SQuAD scorer.
- For --task=causal_lm, `AutoModelForCausalLM` + Trainer with PEFT's LoRA (or full fine-tuning) on
  the Hugging Face folder kft converts a GGUF file into, on kft's rendered prompts with labels on
  completion tokens and EOS only, each batch padded to its longest sequence; scored by kft's eval
  loss and generation scores (`generate`, greedy).

Each returns the same row dictionary as kft's own row: seconds per phase, examples, real token
length sums (for FLOPs), padded positions computed, dev accuracy, peak memory.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import tempfile
import time

import numpy as np

from kft.data import sources as data_lib
from kft.benchmarks import perf
from kft.methods import lora_targets as lora
from kft.config import BUNDLED_BACKBONE, Config


def full_fine_tuning_rate(config: Config) -> float:
    """Both baselines fine-tune the whole model: --learning_rate, or kft's default for full."""
    from kft.training import optim

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

    from kft.models import backbones
    from kft.data import inputs

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


def _training_arguments(config: Config, out: str, learning_rate: float, total_steps: int, precision: dict,
                        schedule: str = "linear"):
    """The Trainer's arguments for kft's flags: same batch, rate, epochs, decay, warmup, clipping, seed."""
    from transformers import TrainingArguments

    return TrainingArguments(
        output_dir=out, per_device_train_batch_size=config.batch_size,
        per_device_eval_batch_size=config.batch_size, learning_rate=learning_rate,
        num_train_epochs=config.epochs, weight_decay=config.weight_decay,
        # = warmup_ratio (transformers 5 takes the ratio as warmup_steps < 1; this works in 4 and 5)
        warmup_steps=int(round(config.warmup_ratio * total_steps)), lr_scheduler_type=schedule,
        max_grad_norm=config.clipnorm or 1e9, seed=config.seed, save_strategy="no",
        eval_strategy="no", report_to=[], logging_steps=max(1, total_steps // 10), use_cpu=True,
        disable_tqdm=True, **precision)


def hf_trainer_available() -> bool:
    return all(importlib.util.find_spec(m) is not None for m in ("torch", "transformers", "accelerate"))


def hf_trainer_missing(config: Config) -> str:
    """What the Hugging Face row lacks to run with these flags ('' when nothing)."""
    if not hf_trainer_available():
        return "torch, transformers or accelerate"
    if config.task == "causal_lm" and config.method == "lora" and importlib.util.find_spec("peft") is None:
        return "peft"
    return ""


def hf_trainer(config: Config, started: float) -> dict:
    """Hugging Face Trainer + DataCollatorWithPadding on the same folder, data and hyperparameters."""
    import torch
    import transformers
    from transformers import (AutoModelForSequenceClassification, AutoTokenizer, DataCollatorWithPadding,
                              Trainer)

    from kft.models import backbones

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
        args = _training_arguments(config, out, full_fine_tuning_rate(config), total_steps, precision)
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


# -- extractive question answering: the Hugging Face `run_qa` recipe ---------------------------------

QA_LABEL = "Hugging Face run_qa (Trainer)"


@dataclasses.dataclass
class Span:
    """The best answer span of one question: its score, window, tokens and characters."""

    score: float
    window: int
    start: int  # token index in the window
    end: int  # inclusive
    char_start: int
    char_end: int  # exclusive


def _best_span(start_logits, end_logits, offsets, context_mask, n_best: int = 20,
               max_answer_length: int = 30) -> Span | None:
    """run_qa's decoding of one question over all of its windows.

    `start_logits`, `end_logits`, `context_mask`: [windows, positions] (the mask is True on the
    tokens of the context); `offsets`: [windows, positions, 2] character (start, end) of each token.
    In each window the `n_best` highest start and end logits are paired; a pair counts when both
    tokens are in the context, end >= start and it spans at most `max_answer_length` tokens; its
    score is start + end logit. The best pair over all windows wins (the first window on a tie);
    None when no window has a valid pair.
    """
    start_logits, end_logits = np.atleast_2d(start_logits), np.atleast_2d(end_logits)
    context_mask = np.atleast_2d(np.asarray(context_mask, bool))
    offsets = np.asarray(offsets)
    if offsets.ndim == 2:
        offsets = offsets[None]
    best = None
    for w in range(start_logits.shape[0]):
        # highest first; a stable sort keeps the lower index first among equal logits
        starts = np.argsort(-start_logits[w], kind="stable")[:n_best]
        ends = np.argsort(-end_logits[w], kind="stable")[:n_best]
        s, e = starts[:, None], ends[None, :]
        valid = (context_mask[w][s] & context_mask[w][e] & (e >= s) & (e - s + 1 <= max_answer_length))
        if not valid.any():
            continue
        scores = np.where(valid, start_logits[w][s] + end_logits[w][e], -np.inf)
        i, j = np.unravel_index(np.argmax(scores), scores.shape)  # start-major order, as run_qa's loops
        if best is None or scores[i, j] > best.score:
            a, b = int(starts[i]), int(ends[j])
            best = Span(float(scores[i, j]), w, a, b, int(offsets[w][a][0]), int(offsets[w][b][1]))
    return best


def _qa_features(tokenizer, questions, max_length: int, stride: int) -> tuple[dict, np.ndarray, np.ndarray,
                                                                             np.ndarray]:
    """run_qa's windows: (model inputs, question index, offsets, context mask) per window."""
    enc = tokenizer([q.question.lstrip() for q in questions.items], [q.context for q in questions.items],
                    truncation="only_second", max_length=max_length, stride=stride,
                    return_overflowing_tokens=True, return_offsets_mapping=True, padding="max_length")
    question_of = np.asarray(enc["overflow_to_sample_mapping"], np.int64)
    offsets = np.asarray(enc["offset_mapping"], np.int64)
    context = np.asarray([[s == 1 for s in enc.sequence_ids(i)] for i in range(len(question_of))], bool)
    names = [k for k in enc.keys() if k not in ("overflow_to_sample_mapping", "offset_mapping")]
    return {k: np.asarray(enc[k], np.int64) for k in names}, question_of, offsets, context


def _qa_labels(questions, question_of, offsets, context, input_ids,
               cls_id: int) -> tuple[np.ndarray, np.ndarray]:
    """Start and end token of each window's answer (the question's first), or the CLS token when the
    window does not contain the whole answer or the question has none (as run_qa labels them)."""
    starts, ends = np.zeros(len(question_of), np.int64), np.zeros(len(question_of), np.int64)
    for i, q in enumerate(question_of):
        ids = input_ids[i]
        cls = int(np.flatnonzero(ids == cls_id)[0]) if (ids == cls_id).any() else 0
        starts[i] = ends[i] = cls
        answers = questions.items[q].answers
        tokens = np.flatnonzero(context[i])
        if not answers or not len(tokens):
            continue
        text, start_char = answers[0]
        end_char = start_char + len(text)
        if not (offsets[i, tokens[0], 0] <= start_char and offsets[i, tokens[-1], 1] >= end_char):
            continue
        starts[i] = tokens[offsets[i, tokens, 0] <= start_char][-1]
        ends[i] = tokens[offsets[i, tokens, 1] >= end_char][0]
    return starts, ends


def _qa_predictions(questions, question_of, offsets, context, start_logits, end_logits, n_best: int,
                    max_answer_length: int, null_threshold: float | None) -> dict[str, str]:
    """Each question's answer text from its windows' logits; with `null_threshold` (SQuAD 2.0) the
    empty answer when the lowest window null score (start + end logit at position 0) beats the best
    span's score by more than it, as run_qa decides."""
    windows: dict[int, list[int]] = {}
    for i, q in enumerate(question_of):
        windows.setdefault(int(q), []).append(i)
    predictions = {}
    for q, rows in windows.items():
        question = questions.items[q]
        span = _best_span(start_logits[rows], end_logits[rows], offsets[rows], context[rows], n_best,
                          max_answer_length)
        text = question.context[span.char_start:span.char_end] if span is not None else ""
        if null_threshold is not None:
            null = float(np.min(start_logits[rows, 0] + end_logits[rows, 0]))
            if span is None or null - span.score > null_threshold:
                text = ""
        predictions[question.id] = text
    return predictions


def hf_question_answering(config: Config, started: float) -> dict:
    """The Hugging Face `run_qa` recipe (AutoModelForQuestionAnswering + Trainer, windows padded to
    max_length, n-best span decoding) on kft's backbone folder, data and hyperparameters."""
    import transformers
    from transformers import (AutoModelForQuestionAnswering, AutoTokenizer, Trainer,
                              default_data_collator)

    from kft.models import backbones
    from kft.training import optim
    from kft.tasks.question_answering import data as qa_data, scoring

    precision = hf_precision(config.precision)
    location, kind = backbones.resolve(config.backbone)
    if kind not in ("bundled", "hf_folder"):
        raise ValueError(f"the Hugging Face row needs a Hugging Face folder as --backbone, not {location}")
    transformers.set_seed(config.seed)
    train_q = qa_data.read_file(config.train_file, "train", "--train_file",
                                config.fix_answer_offsets).head(config.max_train_examples)
    eval_q = qa_data.read_file(config.eval_file, "eval", "--eval_file",
                               config.fix_answer_offsets).head(config.max_eval_examples)
    tokenizer = AutoTokenizer.from_pretrained(location, use_fast=True)
    if not tokenizer.is_fast:
        raise ValueError(f"{location}: run_qa needs a fast tokenizer (offsets), this one is not")
    model = AutoModelForQuestionAnswering.from_pretrained(location)
    rate = perf.torch_matmul_rate()
    # kft's windows: --sequence_length, else 384 (run_qa's default) or the backbone's limit if shorter
    max_length = config.sequence_length or min(384, int(model.config.max_position_embeddings))
    stride = config.doc_stride
    setup = time.time() - started

    t0 = time.time()
    train_enc, train_of, train_offsets, train_context = _qa_features(tokenizer, train_q, max_length, stride)
    train_enc["start_positions"], train_enc["end_positions"] = _qa_labels(
        train_q, train_of, train_offsets, train_context, train_enc["input_ids"], tokenizer.cls_token_id)
    eval_enc, eval_of, eval_offsets, eval_context = _qa_features(tokenizer, eval_q, max_length, stride)
    tokenize_seconds = time.time() - t0

    def rows(enc):
        return [{k: v[i] for k, v in enc.items()} for i in range(len(enc["input_ids"]))]

    train_rows, eval_rows = rows(train_enc), rows(eval_enc)
    windows = len(train_rows)
    total_steps = -(-windows // config.batch_size) * config.epochs
    learning_rate = optim.peak_learning_rate(config)[0]  # the rate kft's row trains with
    with tempfile.TemporaryDirectory() as out:
        args = _training_arguments(config, out, learning_rate, total_steps, precision)
        trainer = Trainer(model=model, args=args, train_dataset=train_rows,
                          data_collator=default_data_collator)
        t0 = time.time()
        trainer.train()
        train_seconds = time.time() - t0
        t0 = time.time()
        start_logits, end_logits = trainer.predict(eval_rows).predictions[:2]
        version_2 = train_q.unanswerable > 0  # null answers as kft decides them: trained on unanswerables
        predictions = _qa_predictions(eval_q, eval_of, eval_offsets, eval_context, np.asarray(start_logits),
                                      np.asarray(end_logits), config.n_best, config.max_answer_length,
                                      config.null_score_threshold if version_2 else None)
        scores = scoring.report(predictions, eval_q)
        eval_seconds = time.time() - t0
    return _qa_row(config, train_enc["attention_mask"].sum(axis=1), max_length, stride, version_2, scores,
                   {"setup": setup, "tokenize": tokenize_seconds, "train": train_seconds, "eval": eval_seconds},
                   {"train": len(train_q), "eval": len(eval_q)}, len(eval_rows), total_steps, learning_rate,
                   rate)


def _qa_row(config: Config, lengths, max_length: int, stride: int, version_2: bool, scores: dict,
            seconds: dict, questions: dict, eval_windows: int, total_steps: int, learning_rate: float,
            rate: float) -> dict:
    """The run_qa row of bench.json from what the run measured (`lengths`: real tokens per window)."""
    import torch
    import transformers

    windows = len(lengths)
    padded = float(windows * max_length * config.epochs)  # every window padded to max_length
    real = float(lengths.sum()) * config.epochs
    return {
        "label": QA_LABEL,
        "status": "full",
        "note": f"{config.precision}; PyTorch, run_qa's windows ({max_length} tokens, stride {stride}, "
                f"padded to {max_length}), n-best {config.n_best} span decoding"
                + ("; SQuAD 2.0 null answers" if version_2 else ""),
        "seconds": seconds,
        "train_seconds": seconds["train"], "eval_seconds": seconds["eval"],
        "steps_run": total_steps, "steps_full": total_steps, "learning_rate": learning_rate,
        "questions": questions,
        "windows": windows, "eval_windows": eval_windows, "sequence_length": max_length,
        "train_examples": windows * config.epochs,  # windows trained on, all epochs
        "windows_per_second": windows * config.epochs / seconds["train"],
        **_lengths_row(lengths, config.epochs),
        "padded_tokens": padded, "padding_share": 1.0 - real / padded,
        "exact_match": float(scores["exact_match"]), "f1": float(scores["f1"]), "dev_accuracy": None,
        "scores": scores,
        "torch_matmul_rate": rate,
        "peak_rss_bytes": perf.peak_rss_bytes(),
        "software": {"torch": torch.__version__, "transformers": transformers.__version__,
                     "torch_threads": torch.get_num_threads()},
    }


# -- decoder fine-tuning (--task=causal_lm): Trainer with PEFT's LoRA -----------------------------------

LM_LABEL = "Hugging Face Trainer + PEFT"
# kft's --lora_targets names -> the llama-family module names PEFT matches
LORA_MODULES = {"query": "q_proj", "key": "k_proj", "value": "v_proj", "attention_output": "o_proj",
                "gate": "gate_proj", "up": "up_proj", "down": "down_proj", "ffn_in": "up_proj",
                "ffn_out": "down_proj"}
LR_SCHEDULES = {"linear": "linear", "cosine": "cosine", "constant": "constant_with_warmup"}


def lm_label(method: str) -> str:
    return LM_LABEL if method == "lora" else "Hugging Face Trainer"


@dataclasses.dataclass
class DecoderText:
    """What kft's prompt rendering and packing read of a decoder, taken from the folder's
    tokenizer_config.json the way kft's loader takes it, with ids from the Hugging Face tokenizer."""

    chat_template: str | None
    special_tokens: dict
    bos_id: int | None
    eos_id: int
    pad_id: int
    stop_ids: list


def decoder_text(location: str, tokenizer, model_config) -> DecoderText:
    """kft.models.backbones.load_decoder's reading of the special tokens, for a Hugging Face tokenizer."""
    import json
    import os

    path = os.path.join(location, "tokenizer_config.json")
    settings = {}
    if os.path.exists(path):
        with open(path) as f:
            settings = json.load(f)

    def token_id(name):
        token = settings.get(name)
        if isinstance(token, dict):
            token = token.get("content")
        if token is None:
            return None
        found = tokenizer.convert_tokens_to_ids(token)
        return None if found is None or (found == tokenizer.unk_token_id and token != tokenizer.unk_token) \
            else int(found)

    eos = token_id("eos_token")
    eos = eos if eos is not None else tokenizer.eos_token_id
    if eos is None:
        raise ValueError(f"{location}: the tokenizer has no end-of-sequence token")
    if settings:
        bos = token_id("bos_token") if settings.get("add_bos_token", False) else None
    else:
        bos = tokenizer.bos_token_id
    pad = token_id("pad_token")
    pad = int(pad if pad is not None else (tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos))
    extra = getattr(model_config, "eos_token_id", None)
    extra = extra if isinstance(extra, list) else [extra] if extra is not None else []
    special = {k: (v.get("content") if isinstance(v, dict) else v) for k, v in settings.items()
               if k.endswith("_token") and isinstance(v, (str, dict))}
    return DecoderText(settings.get("chat_template"), special, bos, int(eos), pad,
                       [int(eos)] + [int(i) for i in extra if int(i) != int(eos)])


def _hf_pieces(tokenizer, split, text: DecoderText, template):
    """(prompt ids, completion ids, cache status) as kft's inputs.tokenize gives them: the rendered
    prompt and the completion tokenized separately, no special tokens added."""
    from kft.tasks.causal_lm import inputs as lm_inputs

    prompts = [lm_inputs.prompt_text(e, template, text.special_tokens) for e in split.examples]
    completions = [e.completion for e in split.examples]

    def ids(texts):
        if not texts:
            return []
        return [np.asarray(x, np.int32) for x in tokenizer(texts, add_special_tokens=False)["input_ids"]]

    return ids(prompts), ids(completions), "off"


def _lm_rows(encoded, train_on_prompt: bool) -> list[dict]:
    """Trainer rows: the model shifts labels itself, so a trained token is labelled at its own
    position (-100 elsewhere); the same positions kft's inputs.matrices trains."""
    rows = []
    for seq, start in zip(encoded.ids, encoded.prompt_lengths):
        first = 0 if train_on_prompt else int(start) - 1
        labels = [-100] * len(seq)
        labels[first + 1:] = [int(t) for t in seq[first + 1:]]
        rows.append({"input_ids": [int(t) for t in seq], "attention_mask": [1] * len(seq), "labels": labels})
    return rows


def _trained(rows: list[dict]) -> int:
    return int(sum(sum(1 for t in r["labels"] if t != -100) for r in rows))


class _CountingCollator:
    """Pads each batch to its longest sequence (labels with -100) and counts the positions computed."""

    def __init__(self, tokenizer):
        from transformers import DataCollatorForSeq2Seq

        self.collate = DataCollatorForSeq2Seq(tokenizer, padding=True, label_pad_token_id=-100)
        self.positions = 0

    def __call__(self, features):
        batch = self.collate(features)
        self.positions += int(batch["input_ids"].numel())
        return batch


def _pad(rows: list, pad_id: int, left: bool, key: str = "input_ids"):
    import torch

    width = max(len(r[key]) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    labels = torch.full((len(rows), width), -100, dtype=torch.long)
    for i, r in enumerate(rows):
        n = len(r[key])
        where = slice(width - n, width) if left else slice(0, n)
        ids[i, where] = torch.as_tensor(r[key])
        mask[i, where] = 1
        if "labels" in r:
            labels[i, where] = torch.as_tensor(r["labels"])
    return ids, mask, labels


def _lm_eval_loss(model, rows: list[dict], batch_size: int, pad_id: int, autocast) -> float:
    """Summed cross-entropy of every trained token over their count (kft's per-token mean); only the
    trained positions are projected to the vocabulary."""
    import torch

    inner = model.get_base_model() if hasattr(model, "get_base_model") else model
    decoder, head = inner.base_model, inner.get_output_embeddings()
    total, count = 0.0, 0
    with torch.no_grad(), autocast():
        for i in range(0, len(rows), batch_size):
            ids, mask, labels = _pad(rows[i:i + batch_size], pad_id, left=False)
            hidden = decoder(input_ids=ids, attention_mask=mask).last_hidden_state
            targets = labels[:, 1:]
            where = targets != -100
            logits = head(hidden[:, :-1][where]).float()
            total += float(torch.nn.functional.cross_entropy(logits, targets[where], reduction="sum"))
            count += int(where.sum())
    return total / max(1, count)


def _lm_generate(model, prompts: list, batch_size: int, max_new_tokens: int, text: DecoderText,
                 autocast) -> tuple[list[list[int]], list[bool]]:
    """Greedy `generate` in batches, prompts left-padded; each output cut before its first stop token."""
    import torch

    out, stopped = [], []
    stop = set(text.stop_ids)
    with torch.no_grad(), autocast():
        for i in range(0, len(prompts), batch_size):
            batch = [{"input_ids": [int(t) for t in p]} for p in prompts[i:i + batch_size]]
            ids, mask, _ = _pad(batch, text.pad_id, left=True)
            generated = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=max_new_tokens,
                                       do_sample=False, num_beams=1, eos_token_id=text.stop_ids,
                                       pad_token_id=text.pad_id)
            for row in generated[:, ids.shape[1]:].tolist():
                end = next((k for k, t in enumerate(row) if t in stop), None)
                out.append(row if end is None else row[:end])
                stopped.append(end is not None)
    return out, stopped


@dataclasses.dataclass
class LMExamples:
    """The Hugging Face row's decoder data: kft's records and packing, Hugging Face token ids."""

    data: object  # kft.tasks.causal_lm.task.LMData
    text: DecoderText
    sequence_length: int
    encoded: dict  # split -> kft.tasks.causal_lm.inputs.Encoded
    rows: dict  # split -> Trainer rows (input_ids, attention_mask, labels)


def lm_examples(config: Config, location: str, tokenizer, model_config, data=None) -> LMExamples:
    """kft's records (--train_file/--eval_file, the same heads and held-out split), prompts rendered
    with the checkpoint's chat template as kft renders them, tokenized by the Hugging Face tokenizer
    and packed by kft's rules: [bos] prompt completion eos, --sequence_length or the 99th
    percentile of train, prompts cut from their start."""
    from kft.tasks.causal_lm import inputs as lm_inputs, task as lm_task

    data = data if data is not None else lm_task.load_data(config)
    text = decoder_text(location, tokenizer, model_config)
    template = lm_task._chat_template(config, text, data.train)
    splits = {"train": data.train, "eval": data.eval}
    pieces = {k: _hf_pieces(tokenizer, split, text, template) for k, split in splits.items()}
    bos = 1 if text.bos_id is not None else 0
    full = np.asarray([len(p) + len(c) + 1 + bos for p, c in zip(*pieces["train"][:2])])
    limit = int(getattr(model_config, "max_position_embeddings", 0) or 1 << 20)
    sequence_length = lm_inputs.choose_length(config, full, limit)
    train_on_prompt = config.train_on_prompt or data.train.plain_text
    encoded = {k: lm_inputs.encode(split, text, template, sequence_length, config.train_on_prompt, None, None,
                                   False, pieces[k]) for k, split in splits.items()}
    return LMExamples(data, text, sequence_length, encoded,
                      {k: _lm_rows(e, train_on_prompt) for k, e in encoded.items()})


def hf_causal_lm(config: Config, started: float) -> dict:
    """The Hugging Face Trainer (+ PEFT LoRA, or full fine-tuning) on the Hugging Face folder kft's
    loader resolves for --backbone (a GGUF file's converted folder), on kft's prompts: the same
    records, chat template rendering, EOS and completion-only labels, tokenized by the Hugging Face
    tokenizer, each batch padded to its longest sequence. Scored as kft scores: the per-token eval
    loss on completion tokens, greedy generation for the first --max_generate_examples eval prompts
    (ROUGE, BLEU)."""
    import os

    import torch
    import transformers
    from transformers import AutoModelForCausalLM, AutoTokenizer, Trainer

    from kft.models import backbones
    from kft.tasks.causal_lm import task as lm_task
    from kft.training import optim

    if config.method not in ("lora", "full"):
        raise ValueError(f"--method={config.method}: the Hugging Face row trains --method=lora (PEFT) or full")
    precision = hf_precision(config.precision)
    location, kind = backbones.resolve_decoder("" if config.backbone == BUNDLED_BACKBONE else config.backbone,
                                               config.cache_dir)
    if kind not in ("bundled", "gguf", "hf_folder"):
        raise ValueError(f"the Hugging Face row needs a Hugging Face folder or GGUF file as --backbone, "
                         f"not {location}")
    torch.set_num_threads(os.cpu_count() or 1)
    transformers.set_seed(config.seed)
    data = lm_task.load_data(config)  # records read in setup, as kft's row reads them
    tokenizer = AutoTokenizer.from_pretrained(location)
    model = AutoModelForCausalLM.from_pretrained(location)
    model, modules = _peft_lora(model, config)
    trainable = int(sum(p.numel() for p in model.parameters() if p.requires_grad))
    rate = perf.torch_matmul_rate()
    setup = time.time() - started

    t0 = time.time()
    examples = lm_examples(config, location, tokenizer, model.config, data)
    tokenize_seconds = time.time() - t0
    train_rows = examples.rows["train"]
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token_id = examples.text.pad_id

    total_steps = -(-len(train_rows) // config.batch_size) * config.epochs
    learning_rate = optim.peak_learning_rate(config)[0]  # the rate kft's row trains with
    collator = _CountingCollator(tokenizer)
    with tempfile.TemporaryDirectory() as out:
        args = _training_arguments(config, out, learning_rate, total_steps, precision,
                                   LR_SCHEDULES[config.lr_schedule])
        trainer = Trainer(model=model, args=args, train_dataset=train_rows, data_collator=collator)
        t0 = time.time()
        trainer.train()
        train_seconds = time.time() - t0
    padded = collator.positions

    t0 = time.time()
    report, generation = _lm_evaluate(model, config, data, examples, tokenizer, precision)
    eval_seconds = time.time() - t0
    seconds = {"setup": setup, "tokenize": tokenize_seconds, "train": train_seconds, "eval": eval_seconds}
    return _lm_row(config, examples, modules, seconds, total_steps, learning_rate, padded, trainable, report,
                   generation, rate)


def _peft_lora(model, config: Config):
    """(model, PEFT module names): LoRA through PEFT on kft's --lora_targets (full: the model as is)."""
    if config.method != "lora":
        return model, []
    from peft import LoraConfig, get_peft_model

    # auto: kft's decoder default, every linear projection (PEFT's all-linear on a llama block)
    targets = lora.ALL_LINEAR if list(config.lora_targets) == ["auto"] else config.lora_targets
    modules = sorted({LORA_MODULES[t] for t in targets if t in LORA_MODULES})
    unknown = sorted(set(targets) - set(LORA_MODULES))
    if unknown or not modules:
        raise ValueError(f"--lora_targets: {unknown or 'none'} have no llama-family module name")
    return get_peft_model(model, LoraConfig(r=config.lora_rank, lora_alpha=config.lora_alpha, lora_dropout=0.0,
                                            target_modules=modules, bias="none", task_type="CAUSAL_LM")), modules


def _lm_evaluate(model, config: Config, data, examples: "LMExamples", tokenizer, precision) -> tuple[dict, dict]:
    """(eval loss and generation scores, generation timing) as kft scores its own row."""
    import contextlib

    import torch

    from kft.reporting import metrics
    from kft.training import loop as loop_lib

    text, eval_rows = examples.text, examples.rows["eval"]
    model.eval()
    batch = loop_lib.eval_batch_size(config)
    autocast = (lambda: torch.autocast("cpu", dtype=torch.bfloat16)) if precision else contextlib.nullcontext
    loss = _lm_eval_loss(model, eval_rows, batch, text.pad_id, autocast)
    report = {"eval_loss": loss, "perplexity": float(np.exp(min(loss, 50.0)))}
    generation = None
    if not data.eval.plain_text and config.max_new_tokens > 0:
        n = min(len(data.eval), config.max_generate_examples or len(data.eval))
        t1 = time.time()
        ids, stopped = _lm_generate(model, examples.encoded["eval"].prompts[:n], batch, config.max_new_tokens,
                                    text, autocast)
        seconds = time.time() - t1
        texts = [tokenizer.decode(x, skip_special_tokens=False, clean_up_tokenization_spaces=False)
                 for x in ids]
        report.update(metrics.generation_scores(texts, [e.completion for e in data.eval.examples[:n]]))
        generation = {"examples": n, "seconds": seconds, "mean_tokens": float(np.mean([len(x) for x in ids])),
                      "stopped_at_eos": float(np.mean(stopped)),
                      "tokens_per_second": sum(len(x) for x in ids) / max(seconds, 1e-9)}
    return report, generation


def _lm_row(config: Config, examples: "LMExamples", modules: list, seconds: dict, total_steps: int,
            learning_rate: float, padded: int, trainable: int, report: dict, generation, rate: float) -> dict:
    """The Trainer row of bench.json from what the run measured."""
    import torch
    import transformers

    train_rows, eval_rows = examples.rows["train"], examples.rows["eval"]
    lengths = examples.encoded["train"].lengths
    real = float(lengths.sum()) * config.epochs
    trained = _trained(train_rows)
    return {
        "label": lm_label(config.method),
        "status": "full",
        "note": f"{config.precision}; PyTorch, "
                + (f"PEFT LoRA r={config.lora_rank} alpha={config.lora_alpha:g} on {','.join(modules)}"
                   if config.method == "lora" else "full fine-tuning")
                + "; DataCollatorForSeq2Seq (each shuffled batch padded to its longest sequence); eval: "
                  "loss on completion tokens, batched generate() with left padding",
        "seconds": seconds,
        "train_seconds": seconds["train"], "eval_seconds": seconds["eval"],
        "steps_run": total_steps, "steps_full": total_steps, "learning_rate": learning_rate,
        "train_examples": len(train_rows) * config.epochs, "sequence_length": examples.sequence_length,
        "trained_tokens": trained, "trained_tokens_run": trained * config.epochs,
        "eval_trained_tokens": _trained(eval_rows), "trainable_parameters": trainable,
        **_lengths_row(lengths, config.epochs),
        "padded_tokens": float(padded), "padding_share": 1.0 - real / max(float(padded), 1.0),
        **report, "generation": generation, "dev_accuracy": None,
        "torch_matmul_rate": rate,
        "peak_rss_bytes": perf.peak_rss_bytes(),
        "software": {"torch": torch.__version__, "transformers": transformers.__version__,
                     "peft": _version("peft"), "torch_threads": torch.get_num_threads()},
    }


def _version(module: str) -> str | None:
    try:
        return importlib.import_module(module).__version__
    except ImportError:
        return None
