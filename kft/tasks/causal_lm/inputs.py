"""Token ids of decoder examples: [bos] prompt completion eos, with the loss on the completion.

Prompts (rendered through the chat template) and completions are tokenized once each, in one
tokenizer call per split (cached under --model_dir like the other tasks). Position t's label is
the token at t + 1 when that token is trained (completion and EOS by default, every token with
--train_on_prompt or for plain text) and -1 otherwise. When an example exceeds --sequence_length
the prompt is cut from its start; a completion is cut only when it alone does not fit, and both
are counted.
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np

from kft.data import inputs as inputs_lib, token_cache
from kft.data.split_inputs import IGNORE, padded, row_lengths
from kft.config import FlagError
from kft.tasks.causal_lm import chat
from kft.tasks.causal_lm.data import Examples
from kft.training import loop as loop_lib


@dataclasses.dataclass
class Encoded:
    ids: list[np.ndarray]  # full sequences (int32)
    prompt_lengths: np.ndarray  # tokens before the first trained position's target (bos included)
    prompts: list[np.ndarray]  # prompt ids for generation (bos included, cut from the start to fit)
    prompt_texts: list[str]  # the rendered prompts (chat template applied)
    prompts_cut: int  # examples whose prompt lost tokens from its start
    completions_cut: int  # examples whose completion (or plain text) lost tokens from its end
    cache: str  # token cache: hit / miss / off

    def __len__(self) -> int:
        return len(self.ids)

    @property
    def lengths(self) -> np.ndarray:
        return row_lengths(self.ids)


def choose_length(config, lengths: np.ndarray, limit: int) -> int:
    """--sequence_length, or the 99th percentile of the train lengths rounded up to 8 (at least 16)."""
    if config.sequence_length:
        if config.sequence_length > limit:
            raise FlagError(f"--sequence_length={config.sequence_length} exceeds the backbone's limit of "
                            f"{limit} positions")
        return config.sequence_length
    return int(min(limit, max(16, math.ceil(np.percentile(lengths, 99) / 8) * 8)))


def prompt_text(example, template: str | None, special_tokens: dict) -> str:
    if not example.messages:
        return ""
    if template:
        return chat.render(template, example.messages, add_generation_prompt=True,
                           special_tokens=special_tokens)
    return chat.plain(example.messages) + "\n"


def _pieces(tokenizer, texts, cache_dir, fingerprint, write):
    ragged, hit = token_cache.word_pieces(tokenizer, texts, cache_dir, fingerprint, write=write)
    values, splits = ragged.flat_values.numpy(), ragged.row_splits.numpy()
    return [values[splits[i]:splits[i + 1]].astype(np.int32) for i in range(len(texts))], hit


def tokenize_pairs(tokenizer, firsts: list[str], seconds: list[str], cache_dir: str | None,
                   fingerprint: str | None, write: bool = True):
    """(pieces of each first text, pieces of each second text, cache status: hit / miss / off), one
    tokenizer call (or token cache entry) per list: prompts and completions, sources and targets."""
    first_ids, hit_first = _pieces(tokenizer, firsts, cache_dir, fingerprint, write)
    second_ids, hit_second = _pieces(tokenizer, seconds, cache_dir, fingerprint, write)
    hit = "off" if cache_dir is None else ("hit" if hit_first and hit_second else "miss")
    return first_ids, second_ids, hit


def encode(split: Examples, loaded, template: str | None, sequence_length: int, train_on_prompt: bool,
           cache_dir: str | None, fingerprint: str | None, write: bool = True,
           pieces: tuple | None = None) -> Encoded:
    """Tokenizes and packs one split (see the module docstring); `pieces` reuses `tokenize`'s output."""
    texts = [prompt_text(e, template, loaded.special_tokens) for e in split.examples]
    prompt_ids, completion_ids, hit = pieces or tokenize(split, loaded, template, cache_dir, fingerprint,
                                                         write)
    bos = [loaded.bos_id] if loaded.bos_id is not None and not (
        template and "bos_token" in template) else []
    eos = [loaded.eos_id]
    ids, starts, prompts = [], [], []
    prompts_cut = completions_cut = 0
    for p, c in zip(prompt_ids, completion_ids):
        keep = np.concatenate([c, eos]).astype(np.int32)
        if len(keep) > sequence_length - len(bos) - 1:
            keep = keep[:max(1, sequence_length - len(bos) - 1)]
            completions_cut += 1
        room = sequence_length - len(bos) - len(keep)
        if len(p) > room:
            prompts_cut += 1
            p = p[len(p) - room:] if room > 0 else p[:0]
        prompt = np.asarray(bos + list(p), np.int32)
        if not len(prompt):  # plain text without bos: the first token is context, not a target
            prompt, keep = keep[:1], keep[1:]
        prompts.append(prompt)
        starts.append(len(prompt))
        ids.append(np.concatenate([prompt, keep]).astype(np.int32))
    return Encoded(ids, np.asarray(starts), prompts, texts, prompts_cut, completions_cut, hit)


def tokenize(split: Examples, loaded, template: str | None, cache_dir: str | None, fingerprint: str | None,
             write: bool = True):
    """(prompt pieces, completion pieces, cache status) of every example, one tokenizer call each."""
    texts = [prompt_text(e, template, loaded.special_tokens) for e in split.examples]
    return tokenize_pairs(loaded.tokenizer, texts, [e.completion for e in split.examples], cache_dir,
                          fingerprint, write)


def matrices(encoded: Encoded, pad_id: int, train_on_prompt: bool):
    """(ids [n, longest], lengths [n], labels [n, longest], trained positions per example [n])."""
    ids = padded(encoded.ids, pad_id)
    labels = np.full(ids.shape, IGNORE, np.int32)
    for i, (seq, start) in enumerate(zip(encoded.ids, encoded.prompt_lengths)):
        first = 0 if train_on_prompt else start - 1  # position start-1 predicts the first completion token
        labels[i, first:len(seq) - 1] = seq[first + 1:]
    sizes = (labels >= 0).sum(axis=1)
    return ids, encoded.lengths, labels, sizes


def padding_share(train, config) -> float:
    """The share of an epoch's computed positions that are padding, in the length-grouped batches the
    loop will build from the `train` feed."""
    plan = inputs_lib.train_plan(train.lengths, config.batch_size, loop_lib.train_buckets(train, config),
                                 config.seed, 0)
    computed = int(plan.widths.sum()) * config.batch_size
    return round(computed / max(1, int(train.lengths.sum())) - 1, 4)
