"""Reading, validating and describing labelled text data.

Sources: CSV / TSV / JSONL files (local or any `tf.io.gfile` path such as gs://), TFDS datasets, and
the small sample that ships with kft. Every problem is reported as a `DataError` naming the file,
line and field; nothing is dropped silently.
"""

from __future__ import annotations

import collections
import csv
import dataclasses
import difflib
import inspect
import io
import json
import os
import re
import socket
import threading
import time
import urllib.parse

import numpy as np
import tensorflow as tf
from absl import logging

from kft.data import augment
from kft import SAMPLE_DATA

SAMPLE_DATASET = "sample_reviews"
_SAMPLE_DIR = SAMPLE_DATA

# Field names and splits of the TFDS datasets kft knows; others use --text_field/--label_field.
TFDS_DEFAULTS = {
    "imdb_reviews": {"text": "text", "label": "label", "eval_split": "test"},
    "glue/sst2": {"text": "sentence", "label": "label", "eval_split": "validation"},
}

_INT_RE = re.compile(r"^[+-]?\d+$")


class DataError(ValueError):
    """Bad input data; the message names the file, line and field."""


@dataclasses.dataclass
class Split:
    """Texts and raw labels of one split, with where each example came from."""

    name: str
    source: str
    texts: list[str]
    labels: list  # ints or strings, as found in the source
    lines: list[int] | None = None  # 1-based source line per example (files only)

    def __len__(self) -> int:
        return len(self.texts)

    def where(self, i: int) -> str:
        return f"{self.source}:{self.lines[i]}" if self.lines else f"{self.source}[{i}]"

    def head(self, n: int) -> "Split":
        if not n or n >= len(self):
            return self
        return self.select(range(n))

    def select(self, indices, name: str | None = None) -> "Split":
        """The examples at `indices`, in that order."""
        return Split(name or self.name, self.source, [self.texts[i] for i in indices],
                     [self.labels[i] for i in indices],
                     [self.lines[i] for i in indices] if self.lines else None)


@dataclasses.dataclass
class LabelVocab:
    """Maps raw label values to class ids 0..k-1 and to display names. Built from train only."""

    values: list  # sorted raw values (all int or all str)
    names: list[str]

    @classmethod
    def from_split(cls, split: Split, label_names: list[str] | None = None,
                   tfds_names: list[str] | None = None) -> "LabelVocab":
        values = sorted(set(split.labels))
        if not values:
            raise DataError(f"{split.source}: no labelled examples")
        if label_names:
            if not all(isinstance(v, int) for v in values):
                raise DataError("--label_names applies to integer labels only; "
                                f"{split.source} has string labels {values[:5]}")
            if max(values) >= len(label_names) or min(values) < 0:
                raise DataError(f"--label_names has {len(label_names)} names but {split.source} "
                                f"has labels {values}")
            names = [label_names[v] for v in values]
        elif tfds_names:
            names = [tfds_names[v] for v in values]
        else:
            names = [str(v) for v in values]
        return cls(values, names)

    def __len__(self) -> int:
        return len(self.values)

    def encode(self, split: Split, label_field: str = "label") -> np.ndarray:
        """Class ids for `split`; a label unseen in train is an error naming where it is."""
        index = {v: i for i, v in enumerate(self.values)}
        ids = np.empty(len(split), dtype=np.int32)
        for i, label in enumerate(split.labels):
            if label not in index:
                raise DataError(f"{split.where(i)}: field '{label_field}': label {label!r} does not occur "
                                f"in the training data (known: {self.values})")
            ids[i] = index[label]
        return ids

    def to_json(self) -> dict:
        return {"values": self.values, "names": self.names}

    @classmethod
    def from_json(cls, d: dict) -> "LabelVocab":
        return cls(list(d["values"]), list(d["names"]))


def _read_bytes(path: str, flag: str) -> bytes:
    if not tf.io.gfile.exists(path):
        raise DataError(f"{path}: file not found (given by {flag})")
    with tf.io.gfile.GFile(path, "rb") as f:
        data = f.read()
    if not data.strip():
        raise DataError(f"{path}: file is empty (given by {flag})")
    return data


def _check_decoded(path: str, line: int, field: str, value: str) -> None:
    # Text was decoded with surrogateescape: undecodable bytes show up as lone surrogates.
    for ch in value:
        if "\udc80" <= ch <= "\udcff":
            raise DataError(f"{path}:{line}: field '{field}': bytes that are not valid UTF-8 "
                            f"(0x{ord(ch) - 0xDC00:02x}); re-encode the file as UTF-8")


def _delimited_rows(path: str, text: str, delimiter: str):
    """Yields (line_number, row) for CSV (quoted) or TSV (GLUE style, no quoting)."""
    if delimiter == "\t":
        for n, line in enumerate(text.split("\n"), start=1):
            line = line.rstrip("\r")
            if line.strip():
                yield n, line.split("\t")
        return
    reader = csv.reader(io.StringIO(text, newline=""), delimiter=",", strict=True)
    start = 1
    try:
        for row in reader:
            if any(cell.strip() for cell in row):
                yield start, row
            start = reader.line_num + 1
    except csv.Error as e:
        raise DataError(f"{path}:{start}: malformed CSV ({e}); check for an unbalanced quote") from None


def _read_delimited(path: str, text: str, delimiter: str, text_field: str,
                    label_field: str | None) -> tuple[list, list, list]:
    rows = _delimited_rows(path, text, delimiter)
    try:
        _, header = next(rows)
    except StopIteration:
        raise DataError(f"{path}: no header line") from None
    header = [h.strip() for h in header]
    wanted = [text_field] + ([label_field] if label_field else [])
    for field, flag in zip(wanted, ("--text_field", "--label_field")):
        if field not in header:
            close = difflib.get_close_matches(field, header, n=1)
            hint = f"; did you mean {flag}={close[0]}?" if close else ""
            raise DataError(f"{path}:1: header has no field '{field}' ({flag}); fields are {header}{hint}")
    ti = header.index(text_field)
    li = header.index(label_field) if label_field else None
    texts, labels, lines = [], [], []
    for line, row in rows:
        if len(row) != len(header):
            raise DataError(f"{path}:{line}: {len(row)} fields, header has {len(header)} "
                            f"({'tab' if delimiter == chr(9) else 'comma'}-separated)")
        texts.append(row[ti])
        labels.append(row[li].strip() if li is not None else None)
        lines.append(line)
    if label_field:
        # Integer-looking labels become ints; a column mixing them with words fails the type check.
        labels = [int(v) if _INT_RE.match(v) else v for v in labels]
    return texts, labels, lines


def json_records(path: str, text: str):
    """(line number, object) for every non-blank line of a JSONL text; bad lines name file and line."""
    for n, line in enumerate(text.split("\n"), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            raise DataError(f"{path}:{n}: not valid JSON ({e.msg} at column {e.colno})") from None
        if not isinstance(record, dict):
            raise DataError(f"{path}:{n}: expected a JSON object, got {type(record).__name__}")
        yield n, record


def _read_jsonl(path: str, text: str, text_field: str, label_field: str | None):
    texts, labels, lines = [], [], []
    for n, record in json_records(path, text):
        for field, flag in ((text_field, "--text_field"), (label_field, "--label_field")):
            if field and field not in record:
                raise DataError(f"{path}:{n}: missing field '{field}' ({flag}); keys are {sorted(record)}")
        value = record[text_field]
        if not isinstance(value, str):
            raise DataError(f"{path}:{n}: field '{text_field}': expected a string, "
                            f"got {type(value).__name__}")
        label = record[label_field] if label_field else None
        if label_field and (isinstance(label, bool) or not isinstance(label, (int, str))):
            raise DataError(f"{path}:{n}: field '{label_field}': expected an int or string label, "
                            f"got {json.dumps(label)}")
        texts.append(value)
        labels.append(label)
        lines.append(n)
    return texts, labels, lines


def read_file(path: str, split_name: str, text_field: str, label_field: str | None = "label",
              flag: str = "--train_file") -> Split:
    """Reads and validates one CSV/TSV/JSONL file."""
    ext = os.path.splitext(path)[1].lower()
    if ext not in (".csv", ".tsv", ".jsonl", ".json"):
        raise DataError(f"{path}: unsupported extension '{ext}' (given by {flag}); "
                        "use .csv, .tsv or .jsonl")
    text = _read_bytes(path, flag).decode("utf-8", errors="surrogateescape")
    text = text.lstrip("\ufeff")
    if ext in (".jsonl", ".json"):
        texts, labels, lines = _read_jsonl(path, text, text_field, label_field)
    else:
        texts, labels, lines = _read_delimited(path, text, "," if ext == ".csv" else "\t",
                                               text_field, label_field)
    if not texts:
        raise DataError(f"{path}: no examples after the header (given by {flag})")
    for t, label, line in zip(texts, labels, lines):
        _check_decoded(path, line, text_field, t)
        if isinstance(label, str):
            _check_decoded(path, line, label_field, label)
        if not t.strip():
            raise DataError(f"{path}:{line}: field '{text_field}' is empty")
        if label_field and label == "":
            raise DataError(f"{path}:{line}: field '{label_field}' is empty")
    split = Split(split_name, path, texts, labels, lines)
    if label_field:
        check_label_types(split, label_field)
    return split


def check_label_types(split: Split, label_field: str) -> None:
    """All labels of a split must be ints or all strings: a mix usually means a broken column."""
    kinds = [int if isinstance(v, int) else str for v in split.labels]
    first = kinds[0]
    for i, kind in enumerate(kinds):
        if kind is not first:
            raise DataError(
                f"{split.where(i)}: field '{label_field}': label {split.labels[i]!r} is "
                f"{'an integer' if kind is int else 'a string'} but {split.where(0)} has "
                f"{'an integer' if first is int else 'a string'} label {split.labels[0]!r}; "
                "labels must be all integers or all strings")


def check_same_label_type(train: Split, other: Split, label_field: str) -> None:
    if not other.labels or not train.labels:
        return
    if isinstance(train.labels[0], int) != isinstance(other.labels[0], int):
        raise DataError(f"{other.where(0)}: field '{label_field}': label {other.labels[0]!r} has a "
                        f"different type than the training labels (e.g. {train.labels[0]!r})")


# Seconds to wait for the download hosts' names to resolve before calling the machine offline.
RESOLVE_TIMEOUT = 5.0


def download_hosts(builder) -> list[str]:
    """The hosts TFDS downloads `builder`'s files from (its registered URLs; else those in its code)."""
    urls = list(getattr(builder, "url_infos", None) or {})
    if not urls:
        try:
            urls = re.findall(r"https?://[^\s'\"]+", inspect.getsource(inspect.getmodule(type(builder))))
        except (OSError, TypeError):
            urls = []
    return sorted({urllib.parse.urlparse(u).hostname for u in urls} - {None})


def unresolved_hosts(hosts: list[str], timeout: float = RESOLVE_TIMEOUT) -> dict[str, str]:
    """{host: why} for the hosts whose names do not resolve within `timeout` seconds (in parallel)."""
    failed = {host: f"no answer within {timeout:g} s" for host in hosts}

    def resolve(host):
        try:
            socket.getaddrinfo(host, 443, proto=socket.IPPROTO_TCP)
            failed.pop(host, None)
        except OSError as e:  # socket.gaierror, or a refused/unreachable resolver
            failed[host] = f"{type(e).__name__}: {e}"

    # Daemon threads: getaddrinfo has no timeout, and a stuck lookup must not hold the process.
    threads = [threading.Thread(target=resolve, args=(h,), daemon=True) for h in hosts]
    for t in threads:
        t.start()
    deadline = time.monotonic() + timeout
    for t in threads:
        t.join(max(0.0, deadline - time.monotonic()))
    return dict(failed)


def _check_network(builder, name: str) -> None:
    """Runs when TFDS is about to download: says so and from where, and fails at once offline
    (TFDS would retry every file for minutes before giving up)."""
    hosts = download_hosts(builder)
    if not hosts:
        logging.info("tfds:%s: not prepared in %s; downloading it (TFDS names no hosts to check first)",
                     name, builder.data_dir)
        return
    logging.info("tfds:%s: not prepared in %s; downloading it from %s", name, builder.data_dir,
                 ", ".join(hosts))
    failed = unresolved_hosts(hosts)
    if len(failed) == len(hosts):
        detail = "; ".join(f"{host} ({why})" for host, why in failed.items())
        raise DataError(f"tfds:{name}: not prepared in {builder.data_dir}, and its download host(s) cannot "
                        f"be resolved: {detail}. This machine seems to have no network access: prepare the "
                        "dataset where there is (tfds.builder(...).download_and_prepare()) and point "
                        "--data_dir at a copy of that data directory")
    if failed:
        logging.warning("tfds:%s: some download hosts do not resolve: %s", name,
                        "; ".join(f"{host} ({why})" for host, why in failed.items()))


def download_and_prepare(builder, name: str) -> None:
    """TFDS download + preparation, any failure reported as a DataError naming the dataset.

    The network check runs only when TFDS decides to download: it is hooked into the builder's
    download manager (created only when the data is not prepared in data_dir yet).
    """
    make_manager = getattr(builder, "_make_download_manager", None)
    if make_manager is not None:
        def checked(*args, **kwargs):
            _check_network(builder, name)
            return make_manager(*args, **kwargs)

        builder._make_download_manager = checked
    else:  # a TFDS without that hook: no check first
        logging.info("tfds:%s: preparing it in %s (downloading it unless it is there)", name,
                     builder.data_dir)
    try:
        builder.download_and_prepare()
    except DataError:
        raise
    except Exception as e:  # TFDS raises network, checksum and filesystem errors of many types.
        raise DataError(f"tfds:{name}: could not download and prepare it in {builder.data_dir} "
                        f"({type(e).__name__}: {str(e)[:300]}). Without network access, prepare it "
                        "on another machine and point --data_dir at a copy") from e


def read_tfds(name: str, split: str, data_dir: str, text_field: str, label_field: str):
    """Loads a TFDS split into memory. Returns (Split, class names or None)."""
    import tensorflow_datasets as tfds

    defaults = TFDS_DEFAULTS.get(name, {})
    builder = tfds.builder(name, data_dir=data_dir or None)
    features = builder.info.features
    text_key = text_field if text_field in features else defaults.get("text", text_field)
    label_key = label_field if label_field in features else defaults.get("label", label_field)
    for key, flag in ((text_key, "--text_field"), (label_key, "--label_field")):
        if key not in features:
            raise DataError(f"tfds:{name}: no feature '{key}' ({flag}); features are {sorted(features)}")
    download_and_prepare(builder, name)
    ds = builder.as_dataset(split=split)
    texts, labels = [], []
    for ex in tfds.as_numpy(ds):
        texts.append(ex[text_key].decode("utf-8"))
        labels.append(int(ex[label_key]))
    names = getattr(features[label_key], "names", None)
    result = Split(split, f"tfds:{name}/{split}", texts, labels)
    for i, t in enumerate(texts):
        if not t.strip():
            raise DataError(f"{result.where(i)}: field '{text_key}' is empty")
    return result, names


def stratified_holdout(split: Split, fraction: float, seed: int) -> tuple[Split, Split]:
    """Splits off `fraction` of each class (seeded) as an evaluation set.

    Every class keeps at least one training row; a class too small to give one to evaluation is
    trained on only, and named in the log. If nothing at all is held out, the file is too small for
    this fraction: a DataError with the numbers, not an empty evaluation set.
    """
    if not 0 < fraction < 1:
        raise DataError(f"--validation_fraction must be in (0, 1) when no eval data is given, got {fraction}")
    rng = np.random.default_rng(seed)
    by_label = collections.defaultdict(list)
    for i, label in enumerate(split.labels):
        by_label[label].append(i)
    held, not_held = set(), {}
    for label, idx in by_label.items():
        k = min(int(round(len(idx) * fraction)), len(idx) - 1)
        if k == 0:
            not_held[label] = len(idx)
        held.update(rng.permutation(idx)[:k].tolist())
    counts = ", ".join(f"{label!r}: {len(idx)}" for label, idx in sorted(by_label.items(), key=str))
    if not held:
        # Smallest class size from which round(n * fraction) >= 1 and a row remains for training.
        needed = max(2, int(0.5 / fraction) + 1)
        raise DataError(
            f"{split.source}: {len(split)} rows in {len(by_label)} classes ({counts}); "
            f"--validation_fraction={fraction:g} holds out no row for evaluation (a class needs at least "
            f"{needed} rows at this fraction). Give --eval_file, more rows, or a larger "
            "--validation_fraction")
    if not_held:
        logging.warning("%s: --validation_fraction=%g holds out no row of %d class(es) with too few rows "
                        "(%s); they are trained on but not evaluated", split.source, fraction,
                        len(not_held), ", ".join(f"{k!r}: {n}" for k, n in sorted(not_held.items(), key=str)))

    def take(name, keep):
        return split.select([i for i in range(len(split)) if (i in held) == keep], name)

    return take("train", False), take("eval", True)


def per_class_sample(split: Split, k: int, seed: int) -> tuple[Split, dict]:
    """K examples of every label, drawn at random (seeded), kept in source order.

    Returns the sample and, per label, how many were available; a label with fewer than K
    examples keeps all of them (reported by the caller, not padded).
    """
    by_label: dict = {}
    for i, label in enumerate(split.labels):
        by_label.setdefault(label, []).append(i)
    rng = np.random.default_rng(seed)
    chosen = []
    for label in sorted(by_label, key=str):
        idx = by_label[label]
        chosen.extend(rng.permutation(idx)[:k].tolist())
    return split.select(sorted(chosen)), {str(label): len(idx) for label, idx in by_label.items()}


def label_distribution(ids: np.ndarray, vocab: LabelVocab) -> dict[str, int]:
    counts = np.bincount(ids, minlength=len(vocab))
    return {name: int(c) for name, c in zip(vocab.names, counts)}


def balanced_class_weights(ids: np.ndarray, num_classes: int) -> dict[int, float]:
    """n / (k * count_c): every class contributes the same total weight to the loss."""
    counts = np.bincount(ids, minlength=num_classes)
    return {i: float(len(ids) / (num_classes * c)) if c else 0.0 for i, c in enumerate(counts)}


@dataclasses.dataclass
class Data:
    """The splits of a run, validated, with the label vocabulary built from train."""

    train: Split
    eval: Split
    test: Split | None
    vocab: LabelVocab
    description: str
    augmentation: dict | None = None  # what --augment added to train (metrics.json)


def augmented(train: Split, config) -> tuple[Split, dict]:
    """Train with --augment's copies appended after the originals (each copy keeps its source's line)."""
    sources, texts, labels, report = augment.texts(config, train.texts, train.labels)
    lines = [train.lines[i] for i in sources] if train.lines else None
    return Split(train.name, train.source, train.texts + texts, train.labels + labels,
                 train.lines + lines if lines is not None else None), report.to_json()


def load(config) -> Data:
    """Loads the splits named by the config (files, a TFDS dataset, or the bundled sample)."""
    tfds_names = None
    label_field = config.label_field
    if config.dataset and (config.train_file or config.eval_file or config.test_file):
        raise DataError("give either --dataset or --train_file/--eval_file/--test_file, not both")
    if config.dataset == SAMPLE_DATASET:
        train = read_file(os.path.join(_SAMPLE_DIR, "reviews_train.tsv"), "train", "sentence", "label")
        eval_ = read_file(os.path.join(_SAMPLE_DIR, "reviews_test.tsv"), "eval", "sentence", "label")
        test, description, label_field = None, "kft sample movie reviews", "label"
    elif config.dataset:
        defaults = TFDS_DEFAULTS.get(config.dataset, {})
        train, tfds_names = read_tfds(config.dataset, config.train_split, config.data_dir,
                                      config.text_field, label_field)
        eval_split = config.eval_split or defaults.get("eval_split", "test")
        eval_, _ = read_tfds(config.dataset, eval_split, config.data_dir, config.text_field, label_field)
        test, description = None, f"tfds:{config.dataset} ({config.train_split} / {eval_split})"
    elif config.train_file:
        train = read_file(config.train_file, "train", config.text_field, label_field, "--train_file")
        eval_ = (read_file(config.eval_file, "eval", config.text_field, label_field, "--eval_file")
                 if config.eval_file else None)
        test = (read_file(config.test_file, "test", config.text_field, label_field, "--test_file")
                if config.test_file else None)
        description = config.train_file
    else:
        raise DataError("no training data: give --dataset (e.g. imdb_reviews, sample_reviews) "
                        "or --train_file")

    train = train.head(config.max_train_examples)
    if eval_ is None:
        train, eval_ = stratified_holdout(train, config.validation_fraction, config.seed)
        description += f" (eval = {config.validation_fraction:.0%} of train, stratified)"
    if config.max_train_examples_per_class:
        k = config.max_train_examples_per_class
        train, available = per_class_sample(train, k, config.seed)
        short = {label: n for label, n in available.items() if n < k}
        if short:
            logging.warning("%s: fewer than %d examples for label(s) %s; all of them are used",
                            train.source, k, short)
        description += f" ({k} per class, seed {config.seed})"
    eval_ = eval_.head(config.max_eval_examples)
    for split in (train, eval_, test):  # e.g. an empty TFDS split; files were checked when read
        if split is not None and not len(split):
            raise DataError(f"{split.source}: the {split.name} split has no examples")
    for other in (eval_, test):
        if other is not None:
            check_same_label_type(train, other, label_field)
    vocab = LabelVocab.from_split(train, config.label_names, tfds_names)
    if config.num_classes and config.num_classes != len(vocab):
        raise DataError(f"--num_classes={config.num_classes} but {train.source} has {len(vocab)} "
                        f"distinct labels: {vocab.values}")
    if len(vocab) < 2:
        raise DataError(f"{train.source}: only one label ({vocab.values}) in the training data")
    augmentation = None
    augment.check_flags(config)
    if config.augment != "none":  # after eval is set aside and few-shot sampling: copies are train only
        train, augmentation = augmented(train, config)
        description += f" (+{augmentation['added']} {config.augment} copies)"
    data = Data(train, eval_, test, vocab, description, augmentation)
    for split in (eval_, test):
        if split is not None:
            vocab.encode(split, label_field)  # fail before training, not after
    return data
