"""Token ids of source/target pairs: the encoder's source and the decoder's prefix, target and end.

Sources and targets are tokenized once each, in one tokenizer call per split (through kft's token
cache). A source longer than --sequence_length loses its end; a target too, after its prefix and
before its end token, which is kept. Both cuts are counted. Decoder position t's label is the
token at t + 1 for the target and end tokens, -1 for the prefix and padding: teacher forcing with
the loss on the target only.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from kft.data.split_inputs import IGNORE, padded, row_lengths
from kft.tasks.causal_lm import chat, inputs as lm_inputs
from kft.tasks.causal_lm.data import Examples


@dataclasses.dataclass
class Encoded:
    sources: list[np.ndarray]  # encoder ids, start and end tokens included
    targets: list[np.ndarray]  # decoder ids: prefix + target + end
    source_texts: list[str]  # what the encoder read, as text
    sources_cut: int  # examples whose source lost tokens from its end
    targets_cut: int  # examples whose target lost tokens from its end
    cache: str  # token cache: hit / miss / off

    @property
    def source_lengths(self) -> np.ndarray:
        return row_lengths(self.sources)

    @property
    def target_lengths(self) -> np.ndarray:
        return row_lengths(self.targets)

    def __len__(self) -> int:
        return len(self.sources)


def source_text(example) -> str:
    """The encoder's text: the user's turn (a template's or a prompt field's text), or, for a chat of
    several context turns, the turns joined as causal_lm writes them without a chat template."""
    if len(example.messages) == 1:
        return example.messages[0]["content"]
    return chat.plain(example.messages)


def tokenize(split: Examples, loaded, cache_dir: str | None, fingerprint: str | None, write: bool = True):
    """(source pieces, target pieces, cache status) of every example, one tokenizer call each."""
    return lm_inputs.tokenize_pairs(loaded.tokenizer, [source_text(e) for e in split.examples],
                                    [e.completion for e in split.examples], cache_dir, fingerprint, write)


def frame_source(pieces: np.ndarray, loaded, sequence_length: int) -> tuple[np.ndarray, bool]:
    """[start] source [end], the source cut at its end to fit; and whether it was cut."""
    room = sequence_length - len(loaded.encoder_start) - len(loaded.encoder_end)
    cut = len(pieces) > room
    ids = np.concatenate([loaded.encoder_start, pieces[:max(room, 0)], loaded.encoder_end])
    return ids.astype(np.int32), cut


def encode(split: Examples, loaded, sequence_length: int, pieces: tuple) -> Encoded:
    """Frames and cuts one split's pieces (see the module docstring)."""
    source_pieces, target_pieces, hit = pieces
    sources, targets = [], []
    sources_cut = targets_cut = 0
    room = sequence_length - len(loaded.decoder_prefix) - 1
    for s, t in zip(source_pieces, target_pieces):
        ids, cut = frame_source(s, loaded, sequence_length)
        sources.append(ids)
        sources_cut += cut
        if len(t) > room:
            t = t[:max(room, 0)]
            targets_cut += 1
        targets.append(np.concatenate([loaded.decoder_prefix, t, [loaded.eos_id]]).astype(np.int32))
    return Encoded(sources, targets, [source_text(e) for e in split.examples], sources_cut, targets_cut, hit)


def matrices(encoded: Encoded, pad_id: int, prefix: int):
    """(source ids [n, s], source lengths [n], decoder ids [n, t], decoder lengths [n],
    labels [n, t], trained positions per example [n])."""
    sources, decoder = padded(encoded.sources, pad_id), padded(encoded.targets, pad_id)
    labels = np.full(decoder.shape, IGNORE, np.int32)
    for i, t in enumerate(encoded.targets):
        labels[i, prefix - 1:len(t) - 1] = t[prefix:]  # position prefix-1 predicts the first target token
    sizes = (labels >= 0).sum(axis=1)
    return sources, encoded.source_lengths, decoder, encoded.target_lengths, labels, sizes
