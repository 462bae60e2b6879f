"""Supervised fine-tuning of encoder–decoders (BART, T5) on source/target pairs, loss on the target.

Data: the JSONL formats of --task=causal_lm (kft/tasks/causal_lm/data.py), read by its code: the
source is the prompt field, the --prompt_template's text or the user's turn; the target is the
completion field or the assistant's answer. Evaluation: teacher-forced loss, perplexity and
next-token accuracy on the eval split at every epoch end; after training, greedy generation for
the eval sources scored by ROUGE-1/2/L, sacreBLEU and exact match (causal_lm's scoring), every
prediction written to predictions.jsonl. `--epochs=0` scores the untouched model.
"""

from __future__ import annotations

import time

import keras
import numpy as np
import tensorflow as tf
from absl import logging

from kft.data import split_inputs
from kft.training import loop as loop_lib
from kft.config import BUNDLED_BACKBONE, Config, FlagError
from kft.tasks.causal_lm import data as data_lib, inputs as lm_inputs, scoring
from kft.tasks.seq2seq import backbone as backbone_lib, inputs as s2s_inputs, model as s2s_model

METHODS = ("full", "freeze", "lora")


def load_backbone(config: Config) -> backbone_lib.LoadedSeq2Seq:
    return backbone_lib.load("" if config.backbone == BUNDLED_BACKBONE else config.backbone)


def load_data(config: Config) -> data_lib.LMData:
    if config.method not in METHODS:
        raise FlagError(f"--method={config.method} is not available for --task=seq2seq; use "
                        f"--method={', '.join(METHODS)}")

    def check(train):
        if train.plain_text:
            raise FlagError(f"{config.train_file}: records hold plain text ('{config.text_field}') without a "
                            f"target; --task=seq2seq trains on source/target pairs: give "
                            f"'{config.prompt_field}' and '{config.completion_field}', a --prompt_template, "
                            "or messages")

    return data_lib.load(config, "seq2seq", "prompt/completion, fields for --prompt_template, or messages",
                         beam=False, check=check)


def served_input(example) -> str:
    """What a client sends to serving_default for this example."""
    # a template of several fields, a prompt field or a chat: the client sends the user's turn
    return example.served if example.served is not None else example.messages[-1]["content"]


def prepare(config: Config, data: data_lib.LMData, loaded, model_dir: str, is_chief: bool = True):
    """Tokenizes every split once (or reads the token cache) and returns what the trainer needs (a
    task_api.Prepared)."""
    from kft.training.task_api import Prepared

    t0 = time.time()
    splits = split_inputs.by_name(data)
    cache_dir, fingerprint = split_inputs.token_cache_site(config, model_dir, loaded.tokenizer)
    pieces = {k: s2s_inputs.tokenize(s, loaded, cache_dir, fingerprint, is_chief) for k, s in splits.items()}
    sequence_length = _sequence_length(config, loaded, pieces["train"])
    encoded = {k: s2s_inputs.encode(s, loaded, sequence_length, pieces[k]) for k, s in splits.items()}
    sources, stats = _feeds(encoded, splits, loaded)
    stats["train"]["source_padding_share"] = lm_inputs.padding_share(sources["train"], config)
    seconds = time.time() - t0
    _log_data(config, data, sequence_length, stats, seconds)

    def generator(model):  # loaded.backbone shares every layer (and LoRA wrapper) with the trained model
        return s2s_model.Generator(loaded.backbone, loaded.seq2seq_lm_class, loaded,
                                   loop_lib.eval_batch_size(config))

    generation_inputs = {k: (e.sources, e.source_texts) for k, e in encoded.items()}
    scorer = scoring.GenerationEval(config, splits, sources, generation_inputs, loaded.tokenizer, generator,
                                    served_input, "sources")
    return Prepared(names=[], sequence_length=sequence_length, sources=sources, stats=stats,
                    description=data.description, seconds=seconds, train_lengths=sources["train"].lengths,
                    evaluate=scorer.evaluate, epoch_eval=scorer.epoch_eval, format=scoring.format_report,
                    write_outputs=scorer.write_outputs, headline=scoring.HEADLINE,
                    predict_function=s2s_model.predict_function, data=data)


def _sequence_length(config: Config, loaded, train_pieces: tuple) -> int:
    """Per side: --sequence_length or the 99th percentile of train's framed sources and targets;
    refuses a --max_new_tokens the decoder has no positions for."""
    source_pieces, target_pieces, _ = train_pieces
    full = np.asarray([max(len(s) + len(loaded.encoder_start) + len(loaded.encoder_end),
                           len(t) + len(loaded.decoder_prefix) + 1) for s, t in zip(source_pieces, target_pieces)])
    sequence_length = lm_inputs.choose_length(config, full, loaded.max_sequence_length)
    if len(loaded.decoder_prefix) + max(config.max_new_tokens, config.export_max_new_tokens) \
            > loaded.max_sequence_length:
        raise FlagError(f"--max_new_tokens={config.max_new_tokens} exceeds the decoder's "
                        f"{loaded.max_sequence_length} positions")
    return sequence_length


def _feeds(encoded: dict, splits: dict, loaded) -> tuple[dict, dict]:
    """(split name -> the loop's feed, split name -> statistics for metrics.json) of encoded splits."""
    prefix = len(loaded.decoder_prefix)
    sources, stats = {}, {}
    for k, enc in encoded.items():
        ids, lengths, decoder, decoder_lengths, labels, sizes = s2s_inputs.matrices(enc, loaded.pad_id, prefix)
        sources[k] = loop_lib.Feed(tf.constant(ids), lengths, labels, np.ones(len(enc), np.float32), sizes,
                                   decoder=(decoder, decoder_lengths))
        stats[k] = {"source": splits[k].source, "examples": len(enc), "format": splits[k].format,
                    "mean_source_tokens": round(float(lengths.mean()), 2), "max_source_tokens": int(lengths.max()),
                    "mean_target_tokens": round(float(decoder_lengths.mean()), 2),
                    "max_target_tokens": int(decoder_lengths.max()), "trained_tokens": int(sizes.sum()),
                    "sources_cut": enc.sources_cut, "targets_cut": enc.targets_cut, "token_cache": enc.cache}
    return sources, stats


def _log_data(config: Config, data: data_lib.LMData, sequence_length: int, stats: dict, seconds: float) -> None:
    logging.info("data: %s; sequence_length=%d per side (%s); tokenized in %.1fs", data.description,
                 sequence_length, split_inputs.length_origin(config), seconds)
    for k, st in stats.items():
        logging.info("  %s: %d examples, mean %.1f source / %.1f target tokens, %d trained tokens; %d source(s) "
                     "and %d target(s) cut at the end (token cache: %s)", k, st["examples"],
                     st["mean_source_tokens"], st["mean_target_tokens"], st["trained_tokens"], st["sources_cut"],
                     st["targets_cut"], st["token_cache"])
        if st["targets_cut"]:
            logging.warning("  %s: %d target(s) longer than --sequence_length=%d lost their end; raise "
                            "--sequence_length to keep them", k, st["targets_cut"], sequence_length)


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
