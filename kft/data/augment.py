"""EDA for scarce training data: seeded synonym replacement, random insertion, swap and deletion.

The four word-level operations of Wei & Zou (2019), applied to training examples only, after the
evaluation split has been set aside (so no copy of an eval example, nor an eval example itself,
is ever rewritten). Each copy draws its operation and its edits from a generator seeded by
(--seed, example index, copy index): the copies do not depend on the order of the data or on
what else the run does. With tags (token classification), only words tagged `O` are replaced,
moved or deleted, and inserted words are tagged `O` and never placed inside an entity, so every
entity keeps its words and its IOB2 tags.

--augment=repeat adds the same number of unchanged copies: the control that separates what EDA's
edits do from what the extra steps on the same examples do.

Synonyms come from a table kft ships (`kft/sample_data/synonyms.tsv`, written for kft) or from
--augment_synonyms; nothing is downloaded.
"""

from __future__ import annotations

import collections
import dataclasses
import os
import re

import numpy as np
from absl import logging
from kft import SAMPLE_DATA

OPERATIONS = ("synonym", "insert", "swap", "delete")
SYNONYMS = os.path.join(SAMPLE_DATA, "synonyms.tsv")

# Words EDA never replaces or uses as an insertion source: function words carry no meaning a
# synonym could keep, and negations would flip a sentiment label.
STOPWORDS = frozenset("""
a about above after again against all am an and any are as at be because been before being below
between both but by can could did do does doing down during each few for from further had has have
having he her here hers herself him himself his how i if in into is it its itself just me more most
my myself no nor not now of off on once only or other our ours ourselves out over own same she
should so some such than that the their theirs them themselves then there these they this those
through to too under until up very was we were what when where which while who whom why will with
would you your yours yourself yourselves n't never nothing neither cannot 's 're 've 'd 'll 'm
""".split())

# A word's core (letters, digits, inner apostrophes and hyphens) with the punctuation around it.
_WORD = re.compile(r"^(\W*)(\w(?:[\w'-]*\w)?)(\W*)$")


class SynonymError(ValueError):
    """A malformed synonym table; the message names the file and line."""


def load_synonyms(path: str = "") -> dict[str, list[str]]:
    """`word<TAB>synonym,synonym,...` per line (lowercase; '#' starts a comment line)."""
    path = path or SYNONYMS
    table: dict[str, list[str]] = {}
    try:
        with open(path, encoding="utf-8") as f:
            lines = f.read().splitlines()
    except OSError as e:
        raise SynonymError(f"--augment_synonyms={path}: cannot read it ({e.strerror})") from None
    for number, line in enumerate(lines, 1):
        if not line.strip() or line.startswith("#"):
            continue
        word, tab, rest = line.partition("\t")
        synonyms = [s.strip().lower() for s in rest.split(",") if s.strip()]
        if not tab or not word.strip() or not synonyms:
            raise SynonymError(f"{path}:{number}: expected 'word<TAB>synonym,synonym,...', got {line!r}")
        table.setdefault(word.strip().lower(), []).extend(s for s in synonyms if s != word.strip().lower())
    if not table:
        raise SynonymError(f"{path}: no synonyms in it")
    return table


@dataclasses.dataclass
class Report:
    """What augmentation added, for the log and metrics.json."""

    method: str
    copies: int  # requested per training example
    rate: float
    seed: int
    synonyms: str
    originals: int = 0
    added: int = 0
    unchanged: int = 0  # copies no operation could change (no synonym, one word): not added
    operations: dict = dataclasses.field(default_factory=collections.Counter)

    def to_json(self) -> dict:
        out = dataclasses.asdict(self)
        out["operations"] = dict(sorted(self.operations.items()))
        return out


class Augmenter:
    """Rewrites one example (its words, and its tags when given) with one EDA operation."""

    def __init__(self, rate: float, seed: int, synonyms: dict[str, list[str]]):
        self.rate, self.seed, self.synonyms = rate, seed, synonyms

    def copy(self, words: list[str], tags: list[str] | None, index: int, copy: int):
        """(operation, words, tags) of copy `copy` of example `index`; operation None if nothing
        could change. Tries the drawn operation first, then the others in a drawn order."""
        rng = np.random.default_rng([self.seed, index, copy])
        first = int(rng.integers(len(OPERATIONS)))
        order = [first] + [int(i) for i in rng.permutation(len(OPERATIONS)) if i != first]
        for i in order:
            name = OPERATIONS[i]
            new_words, new_tags = getattr(self, "_" + name)(list(words), list(tags) if tags else None, rng)
            if new_words != words:
                return name, new_words, new_tags
        return None, words, tags

    def _edits(self, n: int) -> int:
        return max(1, int(self.rate * n))

    @staticmethod
    def _free(tags: list[str] | None, i: int) -> bool:
        """Whether word i may change: always without tags, only outside entities with them."""
        return tags is None or tags[i] == "O"

    def _choices(self, word: str) -> tuple[str, str, str, list[str]] | None:
        m = _WORD.match(word)
        if not m or m.group(2).lower() in STOPWORDS:
            return None
        synonyms = self.synonyms.get(m.group(2).lower())
        return (m.group(1), m.group(2), m.group(3), synonyms) if synonyms else None

    @staticmethod
    def _cased(synonym: str, like: str) -> str:
        if like.isupper() and len(like) > 1:
            return synonym.upper()
        return synonym[:1].upper() + synonym[1:] if like[:1].isupper() else synonym

    def _synonym(self, words, tags, rng):
        candidates = [i for i, w in enumerate(words) if self._free(tags, i) and self._choices(w)]
        chosen = sorted(rng.permutation(candidates)[:self._edits(len(words))].tolist(), reverse=True)
        for i in chosen:  # right to left: a multi-word synonym does not shift the positions still to do
            before, core, after, synonyms = self._choices(words[i])
            pieces = self._cased(synonyms[int(rng.integers(len(synonyms)))], core).split()
            pieces[0], pieces[-1] = before + pieces[0], pieces[-1] + after
            words[i:i + 1] = pieces
            if tags is not None:
                tags[i:i + 1] = ["O"] * len(pieces)
        return words, tags

    def _insert(self, words, tags, rng):
        sources = [i for i, w in enumerate(words) if self._free(tags, i) and self._choices(w)]
        if not sources:
            return words, tags
        for _ in range(self._edits(len(words))):
            _, core, _, synonyms = self._choices(words[int(rng.choice(sources))])
            pieces = synonyms[int(rng.integers(len(synonyms)))].split()
            # never between an entity's B- and I- words (or two I- words)
            slots = [j for j in range(len(words) + 1)
                     if tags is None or j == len(words) or not tags[j].startswith("I-")]
            j = int(rng.choice(slots))
            words[j:j] = pieces
            if tags is not None:
                tags[j:j] = ["O"] * len(pieces)
            sources = [i + len(pieces) if i >= j else i for i in sources]
        return words, tags

    def _swap(self, words, tags, rng):
        free = [i for i in range(len(words)) if self._free(tags, i)]
        if len(free) < 2:
            return words, tags
        for _ in range(self._edits(len(words))):
            i, j = rng.choice(free, size=2, replace=False)
            words[i], words[j] = words[j], words[i]
        return words, tags

    def _delete(self, words, tags, rng):
        if len(words) < 2:
            return words, tags
        drop = {i for i in range(len(words)) if self._free(tags, i) and rng.random() < self.rate}
        if len(drop) == len(words):  # keep one word
            drop.discard(int(rng.choice(sorted(drop))))
        keep = [i for i in range(len(words)) if i not in drop]
        return [words[i] for i in keep], ([tags[i] for i in keep] if tags is not None else None)


def check_flags(config) -> None:
    """--augment_* given without --augment=eda, or out of range, is refused (it would be ignored)."""
    from kft.config import Config, FlagError

    defaults = Config()
    if config.augment == "none":
        for name in ("augment_copies", "augment_rate", "augment_synonyms"):
            if getattr(config, name) != getattr(defaults, name):
                raise FlagError(f"--{name} applies with --augment=eda (or repeat) only")
        return
    if config.augment_copies < 1:
        raise FlagError(f"--augment_copies={config.augment_copies}: give at least 1 copy per example")
    if config.augment == "repeat":
        if config.augment_rate != defaults.augment_rate or config.augment_synonyms != defaults.augment_synonyms:
            raise FlagError("--augment=repeat copies examples unchanged: --augment_rate and --augment_synonyms "
                            "apply with --augment=eda only")
        return
    if not 0 < config.augment_rate <= 0.5:
        raise FlagError(f"--augment_rate={config.augment_rate:g}: the share of words changed must be in (0, 0.5]")


def _augmenter(config) -> tuple[Augmenter, Report]:
    from kft.config import FlagError

    check_flags(config)
    try:
        synonyms = load_synonyms(config.augment_synonyms)
    except SynonymError as e:
        raise FlagError(str(e)) from None
    report = Report(config.augment, config.augment_copies, config.augment_rate, config.seed,
                    config.augment_synonyms or os.path.relpath(SYNONYMS, os.path.dirname(os.path.dirname(SAMPLE_DATA))))
    return Augmenter(config.augment_rate, config.seed, synonyms), report


def _log(report: Report, what: str) -> None:
    logging.info("augmentation (%s): %d %s -> %d added copies (%d per %s asked; %d copies no operation "
                 "could change, not added); operations %s", report.method, report.originals, what,
                 report.added, report.copies, what.rstrip("s"), report.unchanged, dict(report.operations))


def texts(config, texts_in: list[str], labels: list) -> tuple[list[int], list[str], list, Report]:
    """Augmented copies of classification texts: (index of each copy's source, texts, labels, report).

    Words are split on whitespace and joined with one space.
    """
    augmenter, report = _augmenter(config)
    report.originals = len(texts_in)
    sources, new_texts, new_labels = [], [], []
    for i, (text, label) in enumerate(zip(texts_in, labels)):
        words = text.split()
        for c in range(config.augment_copies):
            op, new_words, _ = augmenter.copy(words, None, i, c) if config.augment == "eda" \
                else ("repeat", words, None)
            if op is None:
                report.unchanged += 1
                continue
            report.operations[op] += 1
            sources.append(i)
            new_texts.append(" ".join(new_words) if op != "repeat" else text)
            new_labels.append(label)
    report.added = len(new_texts)
    _log(report, "texts")
    return sources, new_texts, new_labels, report


def sentences(config, words_in: list[list[str]], tags_in: list[list[str]]):
    """Augmented copies of tagged sentences: (index of each copy's source, words, tags, report)."""
    augmenter, report = _augmenter(config)
    report.originals = len(words_in)
    sources, new_words, new_tags = [], [], []
    for i, (words, tags) in enumerate(zip(words_in, tags_in)):
        for c in range(config.augment_copies):
            op, w, t = augmenter.copy(words, tags, i, c) if config.augment == "eda" else ("repeat", words, tags)
            if op is None:
                report.unchanged += 1
                continue
            report.operations[op] += 1
            sources.append(i)
            new_words.append(w)
            new_tags.append(t)
    report.added = len(new_words)
    _log(report, "sentences")
    return sources, new_words, new_tags, report
