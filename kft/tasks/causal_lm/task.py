"""Supervised fine-tuning of decoder LLMs: chats or prompt/completion pairs, loss on completions.

Evaluation: teacher-forced loss, perplexity and next-token accuracy on the eval split at every
epoch end (early stopping and the best epoch use the loss); after training, greedy generation for
the eval prompts scored by ROUGE-1/2/L, sacreBLEU and exact match, with every prediction written
to predictions.jsonl. `--epochs=0` scores the untouched model: the zero-shot row.
"""

from __future__ import annotations

import json
import os
import time

import keras
import numpy as np
import tensorflow as tf
from absl import logging

from kft.models import backbones
from kft.data import split_inputs
from kft.training import loop as loop_lib
from kft.config import BUNDLED_BACKBONE, Config, FlagError
from kft.methods import prompt as prompt_lib
from kft.tasks.causal_lm import data as data_lib, inputs as lm_inputs, model as lm_model, packing, scoring
from kft.tasks.causal_lm.data import LMData


def load_backbone(config: Config) -> backbones.LoadedDecoder:
    spec = "" if config.backbone == BUNDLED_BACKBONE else config.backbone
    # a student (--student_layers) is copied from the float backbone, then quantized by the method
    return backbones.load_decoder(spec, config.cache_dir, base_quantization="none" if config.student_layers
                                  else config.base_quantization)


def load_data(config: Config) -> LMData:
    if config.method == "prefix":
        raise FlagError("--method=prefix is not available for --task=causal_lm: keras-hub's decoder "
                        "attention has no hook for extra keys and values; use --method=prompt or lora")
    return data_lib.load(config, "causal_lm", "messages, prompt/completion, fields for --prompt_template, or "
                         "plain text", beam=True)


def _chat_template(config: Config, loaded, split: data_lib.Examples) -> str | None:
    if split.plain_text or config.chat_template == "none":
        return None
    return loaded.chat_template  # None when the checkpoint has none: prompts are used as written


def _check_packing(backbone: keras.Model, config: Config) -> None:
    import keras_hub

    if not isinstance(backbone, keras_hub.models.LlamaBackbone):
        raise FlagError(f"--pack_sequences supports llama-family decoders (rotary positions: a packed "
                        f"example sees what it sees alone); {type(backbone).__name__} is not one")
    if config.method == "prompt":
        raise FlagError("--pack_sequences with --method=prompt: the prompt vectors would precede a row's "
                        "first example only; use --method=lora or full")


def prepare(config: Config, data: LMData, loaded, model_dir: str, is_chief: bool = True):
    """Tokenizes every split once (or reads the token cache), packs the train rows with
    --pack_sequences, and returns what the trainer needs (a task_api.Prepared)."""
    from kft.training.task_api import Prepared

    if config.pack_sequences:  # before tokenizing: a refused run fails at once
        _check_packing(loaded.backbone, config)
    t0 = time.time()
    data.model_dir = model_dir
    template = _chat_template(config, loaded, data.train)
    splits = split_inputs.by_name(data)
    cache_dir, fingerprint = split_inputs.token_cache_site(config, model_dir, loaded.tokenizer)
    pieces = {k: lm_inputs.tokenize(s, loaded, template, cache_dir, fingerprint, is_chief)
              for k, s in splits.items()}
    bos = 1 if loaded.bos_id is not None else 0
    full = np.asarray([len(p) + len(c) + 1 + bos for p, c in zip(*pieces["train"][:2])])
    sequence_length = lm_inputs.choose_length(config, full, loaded.max_sequence_length)
    encoded = {k: lm_inputs.encode(s, loaded, template, sequence_length, config.train_on_prompt, cache_dir,
                                   fingerprint, is_chief, pieces[k]) for k, s in splits.items()}
    sources, stats = _feeds(encoded, splits, loaded.pad_id, config.train_on_prompt or data.train.plain_text)
    train_lengths = sources["train"].lengths  # per example, packed or not (the bench's attention FLOPs)
    if config.pack_sequences:
        sources["train"], stats["train"]["packed"] = _packed_train(sources["train"], sequence_length,
                                                                   loaded.pad_id)
    stats["train"]["padding_share"] = lm_inputs.padding_share(sources["train"], config)
    seconds = time.time() - t0
    _log_data(config, data, sequence_length, template, stats, seconds)

    def generator(model):  # loaded.backbone shares every layer (and LoRA wrapper) with the trained model
        return lm_model.Generator(loaded.backbone, loaded.causal_lm_class, loaded.stop_ids, loaded.pad_id,
                                  loop_lib.eval_batch_size(config), prompt=prompt_lib.prompt_layer(model))

    generation_inputs = {k: (e.prompts, e.prompt_texts) for k, e in encoded.items()}
    scorer = scoring.GenerationEval(config, splits, sources, generation_inputs, loaded.tokenizer, generator,
                                    _asked, "prompts")
    return Prepared(names=[], sequence_length=sequence_length, sources=sources, stats=stats,
                    description=data.description, seconds=seconds, train_lengths=train_lengths,
                    evaluate=scorer.evaluate, epoch_eval=scorer.epoch_eval, format=scoring.format_report,
                    write_outputs=scorer.write_outputs, headline=scoring.HEADLINE,
                    predict_function=lm_model.predict_function, data=data)


def _asked(example) -> str:
    """The predictions file's input: the last context turn (none for plain text)."""
    return example.messages[-1]["content"] if example.messages else ""


def _feeds(encoded: dict, splits: dict, pad_id: int, train_on_prompt: bool) -> tuple[dict, dict]:
    """(split name -> the loop's feed, split name -> statistics for metrics.json) of encoded splits."""
    sources, stats = {}, {}
    for k, enc in encoded.items():
        ids, lengths, labels, sizes = lm_inputs.matrices(enc, pad_id, train_on_prompt)
        sources[k] = loop_lib.Feed(tf.constant(ids), lengths, labels, np.ones(len(enc), np.float32), sizes)
        stats[k] = {"source": splits[k].source, "examples": len(enc), "format": splits[k].format,
                    "mean_tokens": round(float(lengths.mean()), 2), "max_tokens": int(lengths.max()),
                    "trained_tokens": int(sizes.sum()), "prompts_cut": enc.prompts_cut,
                    "completions_cut": enc.completions_cut, "token_cache": enc.cache}
    return sources, stats


def _packed_train(train, sequence_length: int, pad_id: int):
    """(the train feed as rows of several whole examples, the packing's statistics): --pack_sequences."""
    rows = packing.pack(train.matrix.numpy(), train.lengths, train.labels, sequence_length, pad_id)
    # Rows are nearly full: length buckets would only cut them into batches topped up with padding
    # rows (6 buckets of 50 DialogSum rows at batch 8: 72 rows computed for 50). One bucket.
    packed = loop_lib.Feed(tf.constant(rows.ids), rows.lengths, rows.labels,
                           np.ones(len(rows.lengths), np.float32), rows.sizes, segments=rows.segments, buckets=1)
    stats = {"rows": len(rows.lengths), "examples": len(train.lengths),
             "tokens": int(rows.lengths.sum()), "trained_tokens": int(rows.sizes.sum()),
             "mean_examples_per_row": round(len(train.lengths) / len(rows.lengths), 2),
             "fill": round(float(rows.lengths.sum()) / (len(rows.lengths) * sequence_length), 4)}
    logging.info("  packed: %d train examples into %d rows of up to %d tokens (%.2f per row, %.1f%% full)",
                 len(train.lengths), len(rows.lengths), sequence_length, stats["mean_examples_per_row"],
                 100 * stats["fill"])
    return packed, stats


def _log_data(config: Config, data: LMData, sequence_length: int, template: str | None, stats: dict,
              seconds: float) -> None:
    logging.info("data: %s; sequence_length=%d (%s); chat template: %s; tokenized in %.1fs", data.description,
                 sequence_length, split_inputs.length_origin(config), "the model's" if template else "none",
                 seconds)
    logging.info("  length-grouped batches: %.1f%% of the positions computed in an epoch are padding",
                 100 * stats["train"]["padding_share"])
    for k, st in stats.items():
        logging.info("  %s: %d examples, mean %.1f tokens, %d trained tokens; %d prompt(s) cut from the "
                     "start, %d completion(s) cut at the end (token cache: %s)", k, st["examples"],
                     st["mean_tokens"], st["trained_tokens"], st["prompts_cut"], st["completions_cut"],
                     st["token_cache"])
        if st["completions_cut"]:
            logging.warning("  %s: %d completion(s) longer than --sequence_length=%d lost their end (and "
                            "EOS); raise --sequence_length to keep them", k, st["completions_cut"],
                            sequence_length)


def build(backbone: keras.Model, names: list[str], config: Config) -> keras.Model:
    return lm_model.build_model(backbone, packed=config.pack_sequences)


def loss_function(model: keras.Model, class_weight: dict | None = None):
    return lm_model.loss_function(model)


def check_method(backbone: keras.Model, config: Config) -> None:
    """BitFit needs biases (llama-family decoders have none); prompt tuning generates with the
    llama-family cache pass."""
    import keras_hub

    if config.method == "prompt" and not isinstance(backbone, keras_hub.models.LlamaBackbone):
        raise FlagError(f"--method=prompt with --task=causal_lm supports llama-family decoders (Llama, "
                        f"Llama 3, SmolLM2); {type(backbone).__name__} is not one: use --method=lora")
    if config.method == "bitfit" and not any(v.path.endswith("bias") for v in backbone.weights):
        raise FlagError(f"--method=bitfit trains biases, and {type(backbone).__name__} has no bias "
                        "weights (llama-family decoders use none); use --method=lora")


def _keep_tied_embeddings(backbone, folder: str) -> None:
    """keras-hub 0.32's LlamaBackbone.get_config leaves out tie_word_embeddings, so a tied model (SmolLM2)
    saved as a preset reloads untied and fails for want of an output matrix: write the flag back."""
    path = os.path.join(folder, "config.json")
    with tf.io.gfile.GFile(path) as f:
        saved = json.load(f)
    tied = getattr(backbone, "tie_word_embeddings", None)
    if tied is not None and "tie_word_embeddings" not in saved.get("config", {}):
        saved["config"]["tie_word_embeddings"] = bool(tied)
        with tf.io.gfile.GFile(path, "w") as f:
            json.dump(saved, f, indent=4)


def export(model, loaded, prep, config: Config, run_name: str, metadata: dict) -> str:
    """Writes the generating SavedModel (serving.py) as `<export_dir>/<run_name>/<version>/`, and the
    fine-tuned decoder (LoRA merged) with its tokenizer as a keras-hub preset in
    `<model_dir>/preset/`, which loads back with --backbone=<that folder> (to evaluate, to continue
    training) or keras_hub.models.CausalLM.from_preset.
    """
    from kft.tasks.causal_lm import serving

    preset = os.path.join(prep.data.model_dir, "preset")
    _write_preset(loaded, prep, preset, metadata)
    if config.method == "prompt":
        logging.warning("--method=prompt: the keras-hub preset %s is the unchanged base model (a preset "
                        "cannot hold prompt vectors; they are in adapter.safetensors and in the SavedModel)",
                        preset)
    train = prep.data.train
    template = _chat_template(config, loaded, train)
    if train.plain_text:
        # Continued pretraining on plain text has no prompts to serve: the preset is the artifact.
        logging.warning("plain-text training data has no prompts to serve: no generating SavedModel was "
                        "written; the fine-tuned model is the keras-hub preset %s", preset)
        return preset
    prefix, suffix, described = serving.prompt_affixes(config, loaded, template, train)
    check = [_served_input(e, config, train.format) for e in prep.data.eval.examples]
    try:
        return serving.export(loaded, config, prefix, suffix, described, prep.sequence_length,
                              [c for c in check if c is not None], {**metadata, "preset": preset}, run_name,
                              model)
    except serving.ExportError as e:
        raise FlagError(f"export: {e}") from None


def _served_input(example, config: Config, form: str) -> str | None:
    """What a client sends to serving_default for this example (None: not one served string)."""
    if not example.messages:
        return None
    if example.served is not None:
        return example.served
    return None if form == "template" else example.messages[-1]["content"]


def _write_preset(loaded, prep, folder: str, metadata: dict) -> None:
    staging = folder + ".partial"
    if tf.io.gfile.exists(staging):
        tf.io.gfile.rmtree(staging)
    lm = loaded.causal_lm_class(backbone=loaded.backbone, preprocessor=None)
    lm.backbone.save_to_preset(staging)
    loaded.tokenizer.save_to_preset(staging)
    _keep_tied_embeddings(lm.backbone, staging)
    extra = {**metadata, "sequence_length": prep.sequence_length, "chat_template": loaded.chat_template,
             "tokenizer_kwargs": backbones.tokenizer_special_kwargs(loaded.tokenizer),
             "special_tokens": loaded.special_tokens, "eos_id": loaded.eos_id, "bos_id": loaded.bos_id}
    with tf.io.gfile.GFile(os.path.join(staging, "kft_metadata.json"), "w") as f:
        json.dump(extra, f, indent=2, default=str)
    if loaded.chat_template:  # so that --backbone=<preset> finds the template again
        with tf.io.gfile.GFile(os.path.join(staging, "tokenizer_config.json"), "w") as f:
            json.dump({**loaded.special_tokens, "chat_template": loaded.chat_template,
                       "add_bos_token": loaded.bos_id is not None}, f, indent=2)
    if tf.io.gfile.exists(folder):
        tf.io.gfile.rmtree(folder)
    tf.io.gfile.rename(staging, folder)
    logging.info("wrote the decoder as a keras-hub preset to %s", folder)
