"""Supervised fine-tuning of encoder–decoders (BART, T5) on source/target pairs, loss on the target.

Data: the JSONL formats of --task=causal_lm (kft/tasks/causal_lm/data.py), read by its code: the
source is the prompt field, the --prompt_template's text or the user's turn; the target is the
completion field or the assistant's answer. Evaluation: teacher-forced loss, perplexity and
next-token accuracy on the eval split at every epoch end; after training, greedy generation for
the eval sources scored by ROUGE-1/2/L, sacreBLEU and exact match (causal_lm's scoring), every
prediction written to predictions.jsonl. `--epochs=0` scores the untouched model.
"""

from __future__ import annotations

import dataclasses
import os
import time

import keras
import numpy as np
import tensorflow as tf
from absl import logging

from kft.data import inputs as inputs_lib
from kft.data import token_cache
from kft.training import loop as loop_lib
from kft.config import BUNDLED_BACKBONE, Config, FlagError
from kft.data.sources import DataError
from kft.tasks.causal_lm import data as data_lib, inputs as lm_inputs, scoring
from kft.tasks.seq2seq import backbone as backbone_lib, inputs as s2s_inputs, model as s2s_model

HEADLINE = ("perplexity", "rougeL", "bleu")
METHODS = ("full", "freeze", "lora")


@dataclasses.dataclass
class Seq2SeqData:
    train: data_lib.Split
    eval: data_lib.Split
    test: data_lib.Split | None
    description: str


def load_backbone(config: Config) -> backbone_lib.LoadedSeq2Seq:
    return backbone_lib.load("" if config.backbone == BUNDLED_BACKBONE else config.backbone)


def load_data(config: Config) -> Seq2SeqData:
    if config.method not in METHODS:
        raise FlagError(f"--method={config.method} is not available for --task=seq2seq; use "
                        f"--method={', '.join(METHODS)}")
    from kft.tasks.causal_lm import serving

    try:  # refused before training, not at export after it
        serving.check_sampler(config, beam=False)
    except serving.ExportError as e:
        raise FlagError(str(e)) from None
    if config.dataset:
        raise FlagError("--dataset (TFDS) is not read by --task=seq2seq; give JSONL files with "
                        "--train_file / --eval_file")
    if not config.train_file:
        raise DataError("no training data: give --train_file (JSONL: prompt/completion, fields for "
                        "--prompt_template, or messages)")

    def check(train):
        if train.plain_text:
            raise FlagError(f"{config.train_file}: records hold plain text ('{config.text_field}') without a "
                            f"target; --task=seq2seq trains on source/target pairs: give "
                            f"'{config.prompt_field}' and '{config.completion_field}', a --prompt_template, "
                            "or messages")

    train, eval_, test, description = data_lib.read_splits(config, check)
    return Seq2SeqData(train, eval_, test, description)


def served_input(example) -> str:
    """What a client sends to serving_default for this example."""
    # a template of several fields, a prompt field or a chat: the client sends the user's turn
    return example.served if example.served is not None else example.messages[-1]["content"]


def prepare(config: Config, data: Seq2SeqData, loaded, model_dir: str, is_chief: bool = True):
    from kft.training.task_api import Prepared

    t0 = time.time()
    splits = {"train": data.train, "eval": data.eval}
    if data.test is not None:
        splits["test"] = data.test
    cache_dir = os.path.join(model_dir, "token_cache") if config.cache_tokens else None
    fingerprint = token_cache.tokenizer_fingerprint(loaded.tokenizer) if cache_dir else None
    pieces = {k: s2s_inputs.tokenize(s, loaded, cache_dir, fingerprint, is_chief) for k, s in splits.items()}
    source_pieces, target_pieces, _ = pieces["train"]
    full = np.asarray([max(len(s) + len(loaded.encoder_start) + len(loaded.encoder_end),
                           len(t) + len(loaded.decoder_prefix) + 1) for s, t in zip(source_pieces, target_pieces)])
    sequence_length = lm_inputs.choose_length(config, full, loaded.max_sequence_length)
    if len(loaded.decoder_prefix) + max(config.max_new_tokens, config.export_max_new_tokens) \
            > loaded.max_sequence_length:
        raise FlagError(f"--max_new_tokens={config.max_new_tokens} exceeds the decoder's "
                        f"{loaded.max_sequence_length} positions")
    encoded = {k: s2s_inputs.encode(s, loaded, sequence_length, pieces[k]) for k, s in splits.items()}
    prefix = len(loaded.decoder_prefix)
    sources, stats = {}, {}
    for k, enc in encoded.items():
        ids, lengths, decoder, decoder_lengths, labels, sizes = s2s_inputs.matrices(enc, loaded.pad_id, prefix)
        sources[k] = loop_lib.Split(tf.constant(ids), lengths, labels, np.ones(len(enc), np.float32), sizes,
                                    decoder=(decoder, decoder_lengths))
        stats[k] = {"source": splits[k].source, "examples": len(enc), "format": splits[k].format,
                    "mean_source_tokens": round(float(lengths.mean()), 2), "max_source_tokens": int(lengths.max()),
                    "mean_target_tokens": round(float(decoder_lengths.mean()), 2),
                    "max_target_tokens": int(decoder_lengths.max()), "trained_tokens": int(sizes.sum()),
                    "sources_cut": enc.sources_cut, "targets_cut": enc.targets_cut, "token_cache": enc.cache}
    plan = inputs_lib.train_plan(sources["train"].lengths, config.batch_size, config.num_buckets, config.seed, 0)
    computed = int(plan.widths.sum()) * config.batch_size
    stats["train"]["source_padding_share"] = round(computed / max(1, int(sources["train"].lengths.sum())) - 1, 4)
    seconds = time.time() - t0
    logging.info("data: %s; sequence_length=%d per side (%s); tokenized in %.1fs", data.description,
                 sequence_length, "given" if config.sequence_length else "99th percentile of train", seconds)
    for k, st in stats.items():
        logging.info("  %s: %d examples, mean %.1f source / %.1f target tokens, %d trained tokens; %d source(s) "
                     "and %d target(s) cut at the end (token cache: %s)", k, st["examples"],
                     st["mean_source_tokens"], st["mean_target_tokens"], st["trained_tokens"], st["sources_cut"],
                     st["targets_cut"], st["token_cache"])
        if st["targets_cut"]:
            logging.warning("  %s: %d target(s) longer than --sequence_length=%d lost their end; raise "
                            "--sequence_length to keep them", k, st["targets_cut"], sequence_length)
    eval_sizes = sources["eval"].sizes
    predictions, state = {}, {}

    def epoch_eval(outputs):
        return scoring.epoch_scores(outputs, eval_sizes)

    def evaluate(k, outputs, model):
        report = scoring.loss_report(outputs, sources[k].sizes)
        if config.max_new_tokens <= 0:
            return report
        n = len(splits[k]) if not config.max_generate_examples else min(len(splits[k]),
                                                                          config.max_generate_examples)
        if "generator" not in state:
            # loaded.backbone shares every layer (and LoRA wrapper) with the trained model
            state["generator"] = s2s_model.Generator(loaded.backbone, loaded.seq2seq_lm_class, loaded,
                                                     loop_lib.eval_batch_size(config))
        t = time.time()
        logging.info("generating up to %d tokens for %d %s sources ...", config.max_new_tokens, n, k)
        ids, stopped = state["generator"](encoded[k].sources[:n], config.max_new_tokens)
        texts = scoring.detokenize(loaded.tokenizer, ids)
        examples = splits[k].examples[:n]
        report.update(scoring.generation_report(texts, [e.completion for e in examples], ids, stopped,
                                                time.time() - t))
        predictions[k] = [{"line": e.line, "input": served_input(e), "prompt": p, "reference": e.completion,
                           "prediction": t_, "stopped": s}
                          for e, p, t_, s in zip(examples, encoded[k].source_texts, texts, stopped)]
        return report

    def write_outputs(results, model_dir):
        scoring.write_predictions(predictions, model_dir)

    return Prepared(names=[], sequence_length=sequence_length, sources=sources, stats=stats,
                    description=data.description, seconds=seconds, train_lengths=sources["train"].lengths,
                    evaluate=evaluate, epoch_eval=epoch_eval, format=scoring.format_report,
                    write_outputs=write_outputs, headline=HEADLINE, predict_function=s2s_model.predict_function,
                    data=data)


def build(backbone: keras.Model, names: list[str], config: Config) -> keras.Model:
    return s2s_model.build_model(backbone)


def loss_function(model: keras.Model, class_weight: dict | None = None):
    return s2s_model.loss_function(model)


def check_method(backbone: keras.Model, config: Config) -> None:
    """The output layer is the tied token embedding: freezing the whole backbone leaves nothing to train."""
    if config.freeze_layers == -1:
        raise FlagError("--freeze_layers=-1 freezes every weight of an encoder–decoder (its output layer is "
                        "the tied token embedding); freeze N of its layers, or use --method=lora")


def export(model: keras.Model, loaded, prep, config: Config, run_name: str, metadata: dict) -> str:
    from kft.tasks.seq2seq import serving

    data = prep.data
    prefix, suffix, described = serving.source_affixes(config, data.train)
    check = s2s_inputs.source_text  # what the encoder read in training: the graph tokenizer must agree
    try:
        return serving.export(loaded, config, prefix, suffix, described, prep.sequence_length,
                              [check(e) for e in data.eval.examples], metadata, run_name)
    except serving.ExportError as e:
        raise FlagError(f"export: {e}") from None
