"""Word-tagged sentences for token classification: CoNLL files, JSONL and TFDS `conll2003`.

CoNLL: one `word ... TAG` line per word (the tag column is `--tag_column`, default the last), a blank
line between sentences, `-DOCSTART-` lines skipped. JSONL: one `{"tokens": [...], "tags": [...]}`
per line. The tag vocabulary comes from the training split and is saved with the model. Errors name
file, line and field; ill-formed IOB2 (an `I-X` after neither `B-X` nor `I-X`) is counted and
reported, never repaired.
"""

from __future__ import annotations

import dataclasses

import tensorflow as tf

from kft.data.sources import DataError, download_and_prepare, json_records

DOCSTART = "-DOCSTART-"


@dataclasses.dataclass
class Sentences:
    """Words and tags of one split; `lines[i]` is the source line of sentence i's first word."""

    name: str
    source: str
    words: list[list[str]]
    tags: list[list[str]]
    lines: list[int]
    one_word_per_line: bool = True  # CoNLL: word j of sentence i sits on line lines[i] + j

    def __len__(self) -> int:
        return len(self.words)

    def where(self, i: int, j: int = 0) -> str:
        line = self.lines[i] + (j if self.one_word_per_line else 0)
        return f"{self.source}:{line}" if line else f"{self.source} (sentence {i + 1})"

    def head(self, n: int) -> "Sentences":
        if not n or n >= len(self):
            return self
        return Sentences(self.name, self.source, self.words[:n], self.tags[:n], self.lines[:n],
                         self.one_word_per_line)


def read_conll(path: str, name: str, tag_column: int = -1, flag: str = "--train_file") -> Sentences:
    """Reads a CoNLL-style file; fields are split on tabs when a line has one, else on whitespace."""
    if not tf.io.gfile.exists(path):
        raise DataError(f"{flag}={path}: no such file")
    words, tags, lines = [], [], []
    cur_words, cur_tags, start = [], [], 0
    with tf.io.gfile.GFile(path, "rb") as f:
        raw = f.read()
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        line = raw[:e.start].count(b"\n") + 1
        raise DataError(f"{path}:{line}: field 'token': bytes that are not UTF-8 ({e.reason})") from None

    def close():
        nonlocal cur_words, cur_tags
        if cur_words:
            words.append(cur_words)
            tags.append(cur_tags)
            lines.append(start)
        cur_words, cur_tags = [], []

    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            close()
            continue
        fields = line.split("\t") if "\t" in line else line.split()
        if fields[0] == DOCSTART:
            close()
            continue
        needed = tag_column + 1 if tag_column >= 0 else 2
        if len(fields) < max(2, needed):
            raise DataError(f"{path}:{number}: field 'tag' (column {tag_column}): the line has "
                            f"{len(fields)} column(s): {line[:80]!r}")
        word, tag = fields[0].strip(), fields[tag_column].strip()
        if not word:
            raise DataError(f"{path}:{number}: field 'token': empty token")
        if not tag:
            raise DataError(f"{path}:{number}: field 'tag': empty tag")
        if not cur_words:
            start = number
        cur_words.append(word)
        cur_tags.append(tag)
    close()
    if not words:
        raise DataError(f"{flag}={path}: no sentences")
    return Sentences(name, path, words, tags, lines)


def read_jsonl(path: str, name: str, flag: str = "--train_file") -> Sentences:
    """Reads `{"tokens": [...], "tags": [...]}` lines."""
    if not tf.io.gfile.exists(path):
        raise DataError(f"{flag}={path}: no such file")
    words, tags, lines = [], [], []
    with tf.io.gfile.GFile(path) as f:
        text = f.read()
    for number, row in json_records(path, text):
        for key in ("tokens", "tags"):
            if not isinstance(row.get(key), list):
                raise DataError(f"{path}:{number}: field '{key}': missing or not a list")
        if len(row["tokens"]) != len(row["tags"]):
            raise DataError(f"{path}:{number}: field 'tags': {len(row['tags'])} tags for "
                            f"{len(row['tokens'])} tokens")
        for j, (word, tag) in enumerate(zip(row["tokens"], row["tags"])):
            if not isinstance(word, str) or not word.strip():
                raise DataError(f"{path}:{number}: field 'tokens': token {j} is empty")
            if not isinstance(tag, str) or not tag.strip():
                raise DataError(f"{path}:{number}: field 'tags': tag {j} is empty")
        if row["tokens"]:
            words.append([w.strip() for w in row["tokens"]])
            tags.append([t.strip() for t in row["tags"]])
            lines.append(number)
    if not words:
        raise DataError(f"{flag}={path}: no sentences")
    return Sentences(name, path, words, tags, lines, one_word_per_line=False)


def read_file(path: str, name: str, tag_column: int = -1, flag: str = "--train_file") -> Sentences:
    if path.endswith((".jsonl", ".json")):
        return read_jsonl(path, name, flag)
    return read_conll(path, name, tag_column, flag)


def read_tfds(name: str, split: str, data_dir: str) -> Sentences:
    """A TFDS split with `tokens` and `ner` features (conll2003), in memory."""
    import tensorflow_datasets as tfds

    builder = tfds.builder(name, data_dir=data_dir or None)
    features = builder.info.features
    if "tokens" not in features or "ner" not in features:
        raise DataError(f"tfds:{name}: needs 'tokens' and 'ner' features; it has {sorted(features)}")
    download_and_prepare(builder, name)
    names = features["ner"].feature.names
    words, tags = [], []
    source = f"tfds:{name}/{split}"
    for i, example in enumerate(tfds.as_numpy(builder.as_dataset(split=split))):
        if len(example["tokens"]) != len(example["ner"]):
            raise DataError(f"{source} (sentence {i + 1}): field 'ner': {len(example['ner'])} tags for "
                            f"{len(example['tokens'])} tokens")
        words.append([w.decode("utf-8") for w in example["tokens"]])
        tags.append([names[t] for t in example["ner"]])
    return Sentences(split, source, words, tags, [0] * len(words), False)


@dataclasses.dataclass
class TagVocab:
    """Tag names from the training split: "O" first, then sorted."""

    names: list[str]

    @classmethod
    def from_sentences(cls, train: Sentences) -> "TagVocab":
        seen = {t for sentence in train.tags for t in sentence}
        return cls(sorted(seen, key=lambda t: (t != "O", t[2:], t[:2])))

    def encode(self, split: Sentences) -> list[list[int]]:
        """Tag ids per sentence; a tag unseen in train is an error naming its file and line."""
        index = {t: i for i, t in enumerate(self.names)}
        out = []
        for i, sentence in enumerate(split.tags):
            for j, tag in enumerate(sentence):
                if tag not in index:
                    raise DataError(f"{split.where(i, j)}: field 'tag': {tag!r} does not occur in the "
                                    f"training data (its tags: {', '.join(self.names)})")
            out.append([index[t] for t in sentence])
        return out


def iob2_violations(split: Sentences, limit: int = 5) -> dict:
    """Counts `I-X` tags that follow neither `B-X` nor `I-X`; returns the count and first places."""
    count, places = 0, []
    for i, sentence in enumerate(split.tags):
        previous = "O"
        for j, tag in enumerate(sentence):
            if tag.startswith("I-") and previous[2:] != tag[2:]:
                count += 1
                if len(places) < limit:
                    places.append(f"{split.where(i, j)}: {previous} -> {tag}")
            previous = tag
    return {"count": count, "examples": places}
