"""Questions about a context, answered by a span of it: SQuAD JSON, JSONL and TFDS `squad`.

SQuAD v1.1 / v2.0 JSON (`{"data": [{"title", "paragraphs": [{"context", "qas": [...]}]}]}`; v2.0's
`is_impossible` questions have no answers) or JSONL, one `{"question", "context", "answers": [{"text",
"answer_start"}]}` (or `"answer"` + `"answer_start"`) per line. The format is decided by the content.
Every answer must be found at its `answer_start` (a character offset) in the context; with
`fix_offsets` a wrong offset is moved to the nearest occurrence of the text and counted, never
dropped. Errors name the file, the line (JSONL), the question id and the field.
"""

from __future__ import annotations

import dataclasses
import json

import tensorflow as tf
from absl import logging

from kft.data.sources import DataError, download_and_prepare, json_records

FIX_FLAG = "--fix_answer_offsets"
_SHOW = 60  # characters of context shown in messages


@dataclasses.dataclass
class Question:
    """One question; `answers` holds (text, answer_start) pairs as given, [] = unanswerable."""

    id: str
    question: str
    context: str
    answers: list[tuple[str, int]]
    title: str = ""
    where: str = ""  # "file:line" (JSONL) or "file (question id X)" (JSON, TFDS)


@dataclasses.dataclass
class Questions:
    """The questions of one split and where they came from."""

    name: str
    source: str
    items: list[Question]
    repaired: int = 0  # answer offsets moved by fix_offsets

    def __len__(self) -> int:
        return len(self.items)

    def head(self, n: int) -> "Questions":
        if not n or n >= len(self):
            return self
        return Questions(self.name, self.source, self.items[:n], self.repaired)

    @property
    def unanswerable(self) -> int:
        return sum(1 for q in self.items if not q.answers)


def _show(text: str) -> str:
    return repr(text if len(text) <= _SHOW else text[:_SHOW] + "...")


def _occurrences(text: str, context: str) -> list[int]:
    found, i = [], context.find(text)
    while i >= 0:
        found.append(i)
        i = context.find(text, i + 1)
    return found


class _Reader:
    """Checks questions from any source and keeps the counts and ids seen so far."""

    def __init__(self, path: str, fix_offsets: bool):
        self.path = path
        self.fix_offsets = fix_offsets
        self.items: list[Question] = []
        self.repaired = 0
        self.seen: dict[str, str] = {}  # id -> where it was first seen

    def string(self, at: str, record: dict, field: str, required: bool = True) -> str:
        """A string field; a required one must not be blank either."""
        if field not in record:
            if not required:
                return ""
            raise DataError(f"{at}: missing field '{field}'; keys are {sorted(record)}")
        value = record[field]
        if not isinstance(value, str):
            raise DataError(f"{at}: field '{field}': expected a string, got {type(value).__name__} "
                            f"{json.dumps(value)[:_SHOW]}")
        if required:
            _nonblank(at, field, value)
        return value

    def answer(self, at: str, field: str, context: str, text, start) -> tuple[str, int]:
        """Checks one answer; returns it, its offset repaired when allowed."""
        if not isinstance(text, str):
            raise DataError(f"{at}: field '{field}.text': expected a string, got {type(text).__name__}")
        if not text.strip():
            raise DataError(f"{at}: field '{field}.text': the answer text is empty")
        if isinstance(start, bool) or not isinstance(start, int):
            raise DataError(f"{at}: field '{field}.answer_start': expected an integer character offset, "
                            f"got {json.dumps(start)[:_SHOW]}")
        if context[start:start + len(text)] == text and start >= 0:
            return text, start
        found = _occurrences(text, context)
        if not 0 <= start < len(context):
            problem = (f"field '{field}.answer_start': {start} is out of range for a context of "
                       f"{len(context)} characters (answer {_show(text)})")
        else:
            problem = (f"field '{field}': answer {_show(text)} is not at answer_start {start}; the context "
                       f"there reads {_show(context[start:start + max(len(text), 20)])}")
        if not found:
            raise DataError(f"{at}: {problem}; the text does not occur in the context at all"
                            + (f", so {FIX_FLAG} cannot repair it" if self.fix_offsets else ""))
        nearest = min(found, key=lambda i: (abs(i - start), i))
        if not self.fix_offsets:
            raise DataError(f"{at}: {problem}; it occurs at {', '.join(map(str, found[:5]))}"
                            f"{' ...' if len(found) > 5 else ''} ({FIX_FLAG} moves it to the nearest)")
        if self.repaired < 3:
            logging.info("%s: %s: answer %s moved from %d to %d (%s)", at, field, _show(text), start,
                         nearest, FIX_FLAG)
        self.repaired += 1
        return text, nearest

    def add(self, qid: str, question: str, context: str, answers: list[tuple[str, int]], title: str,
            where: str, at: str, place: str) -> None:
        """`at` prefixes messages about this question; `place` says where it is for duplicates."""
        if qid in self.seen:
            raise DataError(f"{at}: duplicate question id {qid!r}: at {place} and at {self.seen[qid]}")
        self.seen[qid] = place
        self.items.append(Question(qid, question, context, answers, title, where))


def _nonblank(at: str, field: str, value: str) -> None:
    if not value.strip():
        raise DataError(f"{at}: field '{field}' is empty")


def _read_text(path: str, flag: str) -> str:
    if not tf.io.gfile.exists(path):
        raise DataError(f"{flag}={path}: no such file")
    try:
        with tf.io.gfile.GFile(path, "rb") as f:
            raw = f.read()
    except tf.errors.OpError as e:
        raise DataError(f"{flag}={path}: cannot be read ({e.message})") from None
    try:
        text = raw.decode("utf-8").lstrip("\ufeff")
    except UnicodeDecodeError as e:
        line = raw[:e.start].count(b"\n") + 1
        raise DataError(f"{path}:{line}: bytes that are not UTF-8 ({e.reason}); re-encode the file "
                        "as UTF-8") from None
    if not text.strip():
        raise DataError(f"{flag}={path}: the file is empty")
    return text


def _question_id(at: str, record: dict, default: str | None = None) -> str:
    if "id" not in record and default is not None:
        return default
    if "id" not in record:
        raise DataError(f"{at}: missing field 'id'; keys are {sorted(record)}")
    qid = record["id"]
    if isinstance(qid, bool) or not isinstance(qid, (str, int)) or not str(qid).strip():
        raise DataError(f"{at}: field 'id': expected a non-empty string, got {json.dumps(qid)[:_SHOW]}")
    return str(qid)


def _answer_list(reader: _Reader, at: str, value, context: str) -> list[tuple[str, int]]:
    if not isinstance(value, list):
        raise DataError(f"{at}: field 'answers': expected a list of {{\"text\", \"answer_start\"}}, "
                        f"got {type(value).__name__}")
    answers = []
    for k, answer in enumerate(value):
        field = f"answers[{k}]"
        if not isinstance(answer, dict):
            raise DataError(f"{at}: field '{field}': expected an object, got {type(answer).__name__}")
        for key in ("text", "answer_start"):
            if key not in answer:
                raise DataError(f"{at}: field '{field}': missing '{key}'; keys are {sorted(answer)}")
        answers.append(reader.answer(at, field, context, answer["text"], answer["answer_start"]))
    return answers


def _read_squad(reader: _Reader, document: dict) -> None:
    path = reader.path
    articles = document["data"]
    if not isinstance(articles, list):
        raise DataError(f"{path}: field 'data': expected a list of articles, got {type(articles).__name__}")
    for a, article in enumerate(articles):
        at = f"{path} (data[{a}])"
        if not isinstance(article, dict):
            raise DataError(f"{at}: expected an object, got {type(article).__name__}")
        title = reader.string(at, article, "title", required=False)
        paragraphs = article.get("paragraphs")
        if not isinstance(paragraphs, list):
            raise DataError(f"{at}: field 'paragraphs': missing or not a list")
        for p, paragraph in enumerate(paragraphs):
            at = f"{path} (data[{a}].paragraphs[{p}])"
            if not isinstance(paragraph, dict):
                raise DataError(f"{at}: expected an object, got {type(paragraph).__name__}")
            qas = paragraph.get("qas")
            if not isinstance(qas, list):
                raise DataError(f"{at}: field 'qas': missing or not a list")
            if qas and isinstance(qas[0], dict) and "id" in qas[0]:  # name a question of the paragraph
                at = f"{path} (data[{a}].paragraphs[{p}], question id {qas[0]['id']})"
            context = reader.string(at, paragraph, "context")
            for k, qa in enumerate(qas):
                place = f"data[{a}].paragraphs[{p}].qas[{k}]"
                at = f"{path} ({place})"
                if not isinstance(qa, dict):
                    raise DataError(f"{at}: expected an object, got {type(qa).__name__}")
                qid = _question_id(at, qa)
                where = f"{path} (question id {qid})"
                question = reader.string(where, qa, "question")
                impossible = qa.get("is_impossible", False)
                if not isinstance(impossible, bool):
                    raise DataError(f"{where}: field 'is_impossible': expected true or false, "
                                    f"got {json.dumps(impossible)[:_SHOW]}")
                if "answers" not in qa and not impossible:
                    raise DataError(f"{where}: missing field 'answers'; keys are {sorted(qa)}")
                answers = _answer_list(reader, where, qa.get("answers", []), context)
                if impossible and answers:
                    raise DataError(f"{where}: field 'answers': is_impossible is true but it has "
                                    f"{len(answers)} answer(s)")
                title_note = f" (title {title!r})" if title else ""
                reader.add(qid, question, context, answers, title, where, where, place + title_note)


def _read_jsonl(reader: _Reader, text: str) -> None:
    path = reader.path
    for n, record in json_records(path, text):
        qid = _question_id(f"{path}:{n}", record, default=str(n))
        at = f"{path}:{n} (question id {qid})"
        question = reader.string(at, record, "question")
        context = reader.string(at, record, "context")
        title = reader.string(at, record, "title", required=False)
        if "answers" in record:
            answers = _answer_list(reader, at, record["answers"], context)
        elif "answer" in record:
            if "answer_start" not in record:
                raise DataError(f"{at}: missing field 'answer_start' (given 'answer'); "
                                f"keys are {sorted(record)}")
            answers = [reader.answer(at, "answer", context, record["answer"], record["answer_start"])]
        else:
            raise DataError(f"{at}: missing field 'answers' (or 'answer' + 'answer_start'); "
                            f"keys are {sorted(record)}")
        reader.add(qid, question, context, answers, title, f"{path}:{n}", at, f"{path}:{n}")


def read_file(path: str, name: str, flag: str, fix_offsets: bool = False) -> Questions:
    """Reads and checks a SQuAD JSON or a JSONL file of questions."""
    text = _read_text(path, flag)
    reader = _Reader(path, fix_offsets)
    document = None
    if not path.lower().endswith(".jsonl"):
        try:
            document = json.loads(text)
        except json.JSONDecodeError as e:
            # Several JSON values, one a line, is JSONL; anything else was meant as one document.
            first = text.lstrip().split("\n", 1)[0]
            if not (e.msg == "Extra data" or _is_json_object(first)):
                raise DataError(f"{path}:{e.lineno}: not valid JSON ({e.msg} at line {e.lineno}, "
                                f"column {e.colno})") from None
    if isinstance(document, dict) and "data" in document:
        _read_squad(reader, document)
    elif document is None or isinstance(document, dict) and "question" in document:
        _read_jsonl(reader, text)
    else:
        keys = sorted(document) if isinstance(document, dict) else type(document).__name__
        raise DataError(f"{path}: neither SQuAD JSON (an object with a 'data' list) nor JSONL (one "
                        f"question object a line); found {keys}")
    if not reader.items:
        raise DataError(f"{flag}={path}: no questions")
    return Questions(name, path, reader.items, reader.repaired)


def _is_json_object(line: str) -> bool:
    try:
        return isinstance(json.loads(line), dict)
    except json.JSONDecodeError:
        return False


def read_tfds(dataset: str, split: str, data_dir: str = "") -> Questions:
    """A TFDS split with SQuAD's features (`squad`, `squad/v1.1`, `squad/v2.0`), in memory."""
    import tensorflow_datasets as tfds

    builder = tfds.builder(dataset, data_dir=data_dir or None)
    features = builder.info.features
    missing = [k for k in ("id", "context", "question", "answers") if k not in features]
    if missing:
        raise DataError(f"tfds:{dataset}: needs SQuAD's features id, context, question and answers; "
                        f"it has {sorted(features)}")
    download_and_prepare(builder, dataset)
    source = f"tfds:{dataset}/{split}"
    reader = _Reader(source, fix_offsets=False)

    def decode(value) -> str:
        return value.decode("utf-8") if isinstance(value, bytes) else str(value)

    for i, example in enumerate(tfds.as_numpy(builder.as_dataset(split=split))):
        qid = decode(example["id"])
        where = f"{source} (question id {qid})"
        context, question = decode(example["context"]), decode(example["question"])
        _nonblank(where, "question", question)
        _nonblank(where, "context", context)
        texts, starts = example["answers"]["text"], example["answers"]["answer_start"]
        if len(texts) != len(starts):
            raise DataError(f"{where}: field 'answers': {len(texts)} texts but {len(starts)} "
                            "answer_start values")
        answers = [reader.answer(where, f"answers[{k}]", context, decode(t), int(s))
                   for k, (t, s) in enumerate(zip(texts, starts))]
        title = decode(example["title"]) if "title" in example else ""
        reader.add(qid, question, context, answers, title, where, where, f"example {i + 1}")
    if not reader.items:
        raise DataError(f"{source}: no questions")
    return Questions(split, source, reader.items)
