"""The generating SavedModel of encoder–decoder runs: text in, generated text out, in graph ops only.

Endpoints (each takes a batch of any size, an empty one included):
  - serving_default(prompt): the served input (the --prompt_template's one field, the prompt field,
    or the user's turn) placed in the training source's fixed text, tokenized by the byte-level BPE
    in graph ops (kft/tasks/causal_lm/graph_tokenizer.py: checked against training's ids before
    writing), framed and cut at its end as in training, greedy (or --export_sampler) generation by
    the loop the evaluation ran (model.generate), detokenized. Returns completion, completion_tokens,
    stopped (the end token came before the cap) and prompt_tokens_cut.
  - generate_raw(prompt): the same for a source text given whole (equal to serving_default when the
    training sources had no fixed text around the served input).
"""

from __future__ import annotations

import tensorflow as tf
from absl import logging

from kft.tasks.causal_lm import chat, data as data_lib, graph_tokenizer
from kft.tasks.causal_lm.serving import ExportError, _pick
from kft.tasks.seq2seq import model as seq2seq_model

_SENTINEL = "\ue001kft-source\ue001"


def source_affixes(config, train: data_lib.Split) -> tuple[str, str, str]:
    """(text before, text after, what the served `prompt` is) of the training sources."""
    if train.format == "template":
        fields = data_lib.template_fields(config.prompt_template)
        if len(fields) != 1:
            return "", "", (f"the whole source: --prompt_template reads {len(fields)} fields, so the client "
                            "fills it")
        text = data_lib.unescape(config.prompt_template).format(**{fields[0]: _SENTINEL})
        before, after = text.split(_SENTINEL, 1)
        return before, after, f"the '{fields[0]}' field (--prompt_template applied in the graph)"
    if train.format == "prompt_completion":
        return "", "", f"the '{config.prompt_field}' field"
    first = train.examples[0].messages[:-1]
    if first and all(e.messages[:-1] == first for e in train.examples):
        before, after = chat.plain(first + [{"role": "user", "content": _SENTINEL}]).split(_SENTINEL, 1)
        return before, after, (f"the user's turn (after the {len(first)} context turn(s) every training chat "
                                "starts with)")
    if any(len(e.messages) > 1 for e in train.examples):
        return "", "", "the user's turn (training chats had differing earlier turns; served sources have none)"
    return "", "", "the user's turn"


class Endpoints:
    """The graph functions of the export, over a (LoRA-merged) backbone and its tokenizer."""

    def __init__(self, loaded, config, prefix: str, suffix: str, sequence_length: int):
        self.loaded = loaded
        self.lm = loaded.seq2seq_lm_class(backbone=loaded.backbone, preprocessor=None)
        self.bpe = graph_tokenizer.for_tokenizer(loaded.tokenizer)
        self.tokenizer = loaded.tokenizer
        self.prefix, self.suffix = prefix, suffix
        self.sequence_length = int(sequence_length)
        self.max_new_tokens = int(config.export_max_new_tokens or config.max_new_tokens)
        if self.max_new_tokens < 1:
            raise ExportError("the export generates nothing with --max_new_tokens=0; give "
                              "--export_max_new_tokens=N")
        if len(loaded.decoder_prefix) + self.max_new_tokens > loaded.max_sequence_length:
            raise ExportError(f"--export_max_new_tokens={self.max_new_tokens} exceeds the decoder's "
                              f"{loaded.max_sequence_length} positions")
        self.pick = _pick(config)
        self.seed = int(config.seed)

    def tokenize(self, texts):
        if self.bpe is not None:
            return self.bpe.tokenize(texts)
        return tf.cast(self.tokenizer(texts), tf.int32)

    def detokenize(self, ids):
        if self.bpe is not None:
            return self.bpe.detokenize(ids)
        return self.tokenizer.detokenize(ids)

    def _sources(self, texts):
        """Encoder ids [b, w] and mask: [start] tokens [end], the tokens cut at their end to fit
        the training --sequence_length (as inputs.frame_source); and the tokens cut."""
        pieces = self.tokenize(texts)
        start, end = self.loaded.encoder_start, self.loaded.encoder_end
        room = self.sequence_length - len(start) - len(end)
        cut = tf.maximum(tf.cast(pieces.row_lengths(), tf.int32) - room, 0)
        kept = pieces[:, :room]

        def fixed(values):  # the same ids on every row
            return tf.RaggedTensor.from_tensor(tf.tile(tf.constant([values], tf.int32), [kept.nrows(), 1]))

        ids = tf.concat(([fixed(start)] if start else []) + [kept] + ([fixed(end)] if end else []), axis=1)
        mask = tf.ones_like(ids).to_tensor(0)
        return ids.to_tensor(self.loaded.pad_id), mask, cut

    def _complete(self, texts):
        texts = tf.convert_to_tensor(texts, tf.string)

        def run():
            ids, mask, cut = self._sources(texts)
            generated, stopped = seq2seq_model.generate(
                self.lm, ids, mask, self.loaded.decoder_prefix, self.max_new_tokens, self.loaded.stop_ids,
                self.loaded.pad_id, self.pick, self.seed)
            # Byte-level tokens can end inside a character: invalid UTF-8 becomes U+FFFD, as the
            # in-memory evaluation decodes it (errors="replace").
            text = tf.strings.unicode_transcode(self.detokenize(generated), "UTF-8", "UTF-8", errors="replace",
                                                replace_control_characters=False)
            return {"completion": text, "completion_tokens": tf.cast(generated.row_lengths(), tf.int32),
                    "stopped": stopped, "prompt_tokens_cut": cut}

        def nothing():  # an empty batch: the model is not called
            return {"completion": tf.zeros([0], tf.string), "completion_tokens": tf.zeros([0], tf.int32),
                    "stopped": tf.zeros([0], tf.bool), "prompt_tokens_cut": tf.zeros([0], tf.int32)}

        return tf.cond(tf.shape(texts)[0] > 0, run, nothing)

    def serve(self, prompt):
        return self._complete(tf.strings.join([self.prefix, prompt, self.suffix]))

    def generate_raw(self, prompt):
        return self._complete(prompt)


def export(loaded, config, prefix: str, suffix: str, described: str, sequence_length: int,
           check_texts: list[str], metadata: dict, run_name: str) -> str:
    """Writes the generating SavedModel as a new version under --export_dir/<run_name>/."""
    from kft import export as export_lib

    try:
        endpoints = Endpoints(loaded, config, prefix, suffix, sequence_length)
    except ValueError as e:
        raise ExportError(str(e)) from None
    # The served ids must be the ones the model was trained on: check the graph tokenizer.
    graph_tokenize = tf.function(endpoints.tokenize, input_signature=[tf.TensorSpec([None], tf.string)])
    differ = graph_tokenizer.check(graph_tokenize, loaded.tokenizer, check_texts)
    if differ:
        raise ExportError(f"the graph tokenizer gives other ids than training's for {len(differ)} of "
                          f"{len(check_texts)} eval sources (first: {check_texts[differ[0]][:80]!r}); "
                          "not exported")
    string = [tf.TensorSpec([None], tf.string, name="prompt")]
    functions = {"serving_default": (endpoints.serve, string), "generate_raw": (endpoints.generate_raw, string)}
    sampler = {"sampler": config.export_sampler}
    if config.export_sampler != "greedy":
        sampler.update(temperature=config.export_temperature, seed=config.seed,
                       **({"top_k": config.export_top_k} if config.export_sampler == "top_k"
                          else {"top_p": config.export_top_p}))
    metadata = {**metadata, "sequence_length": sequence_length, "generation": {
        **sampler, "max_new_tokens": endpoints.max_new_tokens, "stop_ids": list(loaded.stop_ids),
        "encoder_start": loaded.encoder_start, "encoder_end": loaded.encoder_end,
        "decoder_prefix": loaded.decoder_prefix, "prompt_input": described, "prompt_prefix": prefix,
        "prompt_suffix": suffix, "tokenizer_checked_on": len(check_texts)}}
    tracked = [endpoints.bpe] if endpoints.bpe is not None else [loaded.tokenizer]
    path = export_lib.write(endpoints.lm.backbone, tracked, functions, [], config.export_dir, run_name,
                            metadata)
    logging.info("exported the generating encoder–decoder SavedModel (%s sampling, up to %d new tokens) to %s",
                 config.export_sampler, endpoints.max_new_tokens, path)
    return path
