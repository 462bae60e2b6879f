"""Loading a pretrained encoder–decoder (BART from a Hugging Face folder, T5 from a keras-hub preset)
with its tokenizer, its keras-hub Seq2SeqLM class and the token ids that frame its two sequences.

How a family frames its sequences (as its keras-hub preprocessor and its Hugging Face config do):
  - BART: encoder [<s>] source [</s>]; decoder [</s>, <s>] target [</s>] (decoder_start_token_id
    is </s>, and generation is forced to write <s> first, so both are the decoder's prefix);
  - T5: encoder source [</s>]; decoder [<pad>] target [</s>].
"""

from __future__ import annotations

import dataclasses

import keras
import keras_hub
from absl import logging

from kft.models import backbones
from kft.models.backbones import BackboneError


@dataclasses.dataclass
class LoadedSeq2Seq:
    backbone: keras.Model
    tokenizer: keras.layers.Layer
    seq2seq_lm_class: type  # the keras-hub Seq2SeqLM for this backbone (encoder call, decoder KV cache)
    source: str
    kind: str  # "preset", "keras_folder" or "hf_folder"
    encoder_start: list[int]  # ids before a source
    encoder_end: list[int]  # ids after a source
    decoder_prefix: list[int]  # ids the decoder reads before the first target token
    eos_id: int  # ends every target; generation stops at it
    pad_id: int

    @property
    def num_layers(self) -> int:
        return len(backbones.transformer_layers(self.backbone))

    @property
    def max_sequence_length(self) -> int:
        # T5's relative positions have no limit; 512 is what its checkpoints were trained with.
        return int(getattr(self.backbone, "max_sequence_length", 0) or 512)

    @property
    def stop_ids(self) -> list[int]:
        return [self.eos_id]


def _seq2seq_lm_class(backbone: keras.Model, spec: str) -> type:
    found = backbones.task_class(backbone, keras_hub.models.Seq2SeqLM)
    if found is not None:
        return found
    raise BackboneError(f"--backbone={spec}: {type(backbone).__name__} is not an encoder–decoder keras-hub "
                        "can generate with (no Seq2SeqLM class for it); --task=seq2seq takes BART or T5")


def load(spec: str, load_weights: bool = True) -> LoadedSeq2Seq:
    """Loads an encoder–decoder for a --backbone value (a folder or a keras-hub preset name)."""
    if not spec:
        raise BackboneError("--task=seq2seq has no bundled model: give --backbone=<Hugging Face BART folder "
                            "or keras-hub BART/T5 preset>")
    location, kind = backbones.resolve(spec)
    try:
        backbone = keras_hub.models.Backbone.from_preset(location, load_weights=load_weights)
        tokenizer = keras_hub.models.Tokenizer.from_preset(location)
    except Exception as e:  # keras-hub raises a variety of errors for unsupported checkpoints.
        raise BackboneError(f"--backbone={spec} ({location}): keras-hub could not load it as an "
                            f"encoder–decoder: {type(e).__name__}: {e}") from e
    lm_class = _seq2seq_lm_class(backbone, spec)
    eos = getattr(tokenizer, "end_token_id", None)
    pad = getattr(tokenizer, "pad_token_id", None)
    if eos is None or pad is None:
        raise BackboneError(f"--backbone={spec}: the tokenizer has no end or padding token")
    eos, pad = int(eos), int(pad)
    if isinstance(backbone, keras_hub.models.T5Backbone):
        start, end, prefix = [], [eos], [pad]
    else:
        bos = int(tokenizer.start_token_id)
        start, end, prefix = [bos], [eos], [eos, bos]
    loaded = LoadedSeq2Seq(backbone, tokenizer, lm_class, location, kind, start, end, prefix, eos, pad)
    if load_weights:
        backbones.check_weights(loaded, spec)
    logging.info("encoder–decoder %s: encoder %s + source + %s, decoder prefix %s", type(backbone).__name__,
                 start, end, prefix)
    return loaded
