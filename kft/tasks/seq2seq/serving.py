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

from kft.tasks.causal_lm import chat, data as data_lib
from kft.tasks.causal_lm.serving import (ExportError, TextEndpoints, _pick, check_sampler, export_max_new_tokens,
                                        write_export)
from kft.tasks.seq2seq import model as seq2seq_model

_SENTINEL = "\ue001kft-source\ue001"


def source_affixes(config, train: data_lib.Examples) -> tuple[str, str, str]:
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


class Endpoints(TextEndpoints):
    """The graph functions of the export, over a (LoRA-merged) backbone and its tokenizer."""

    def __init__(self, loaded, config, prefix: str, suffix: str, sequence_length: int):
        self.loaded = loaded
        super().__init__(loaded.seq2seq_lm_class(backbone=loaded.backbone, preprocessor=None), loaded.tokenizer,
                         prefix, suffix)
        self.sequence_length = int(sequence_length)
        self.max_new_tokens = export_max_new_tokens(config)
        if len(loaded.decoder_prefix) + self.max_new_tokens > loaded.max_sequence_length:
            raise ExportError(f"--export_max_new_tokens={self.max_new_tokens} exceeds the decoder's "
                              f"{loaded.max_sequence_length} positions")
        check_sampler(config, beam=False)
        self.pick = _pick(config)
        self.seed = int(config.seed)

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

    def _completions(self, texts):
        ids, mask, cut = self._sources(texts)
        generated, stopped = seq2seq_model.generate(
            self.lm, ids, mask, self.loaded.decoder_prefix, self.max_new_tokens, self.loaded.stop_ids,
            self.loaded.pad_id, self.pick, self.seed)
        return generated, stopped, cut


def export(loaded, config, prefix: str, suffix: str, described: str, sequence_length: int,
           check_texts: list[str], metadata: dict, run_name: str) -> str:
    """Writes the generating SavedModel as a new version under --export_dir/<run_name>/."""
    endpoints = Endpoints.create(loaded, config, prefix, suffix, sequence_length)
    generation = {"stop_ids": list(loaded.stop_ids), "encoder_start": loaded.encoder_start,
                  "encoder_end": loaded.encoder_end, "decoder_prefix": loaded.decoder_prefix,
                  "prompt_input": described, "prompt_prefix": prefix, "prompt_suffix": suffix}
    return write_export(endpoints, config, check_texts, "sources", sequence_length, generation, metadata,
                        run_name, "encoder–decoder ")
