"""Reading decoder training data: chats, prompt/completion pairs, templated records, plain text.

One JSONL record becomes one `Example`: the context turns (what the model reads) and the completion
(what it is trained to write), or a plain text for continued pretraining. The record's shape decides
the format, checked for every line:
  - `--messages_field` (default `messages`): a list of {role, content}; the last turn must be the
    assistant's and is the completion, the earlier turns are the context;
  - `--prompt_template` (e.g. 'Summarize:\\n{dialogue}') with `--completion_field` (e.g. summary);
  - `--prompt_field` / `--completion_field` (default prompt / completion);
  - `--text_field` alone: plain text, every token trained.
Errors name the file, the line and the field.
"""

from __future__ import annotations

import dataclasses
import string

import numpy as np

from kft.config import FlagError
from kft.data.sources import DataError, _read_bytes, json_records
from kft.tasks.causal_lm.chat import ROLES


@dataclasses.dataclass
class Example:
    messages: list[dict]  # context turns [{role, content}]; empty for plain text
    completion: str  # the assistant's answer; for plain text, the whole text
    line: int  # 1-based line in the source file
    served: str | None = None  # what a client sends the export for it (the template's one field)


@dataclasses.dataclass
class Examples:
    """One split of decoder examples, read from one source in one format."""

    name: str
    source: str
    examples: list[Example]
    format: str  # "messages", "template", "prompt_completion" or "text"

    def __len__(self) -> int:
        return len(self.examples)

    def where(self, i: int) -> str:
        return f"{self.source}:{self.examples[i].line}"

    def head(self, n: int) -> "Examples":
        return self if not n or n >= len(self) else dataclasses.replace(self, examples=self.examples[:n])

    def select(self, indices, name: str) -> "Examples":
        return dataclasses.replace(self, name=name, examples=[self.examples[i] for i in indices])

    @property
    def plain_text(self) -> bool:
        return self.format == "text"


def template_fields(template: str) -> list[str]:
    """The record fields a --prompt_template reads ('{dialogue}' -> ['dialogue'])."""
    try:
        return [name for _, name, _, _ in string.Formatter().parse(template) if name]
    except ValueError as e:
        raise DataError(f"--prompt_template={template!r} is not a valid format string: {e}") from None


def unescape(template: str) -> str:
    """--prompt_template as written in a shell or flagfile: the two characters \\n mean a newline."""
    return template.replace("\\n", "\n").replace("\\t", "\t")


def detect_format(record: dict, config) -> str:
    if config.messages_field in record:
        return "messages"
    if config.prompt_template:
        return "template"
    if config.prompt_field in record:
        return "prompt_completion"
    if config.text_field in record and config.completion_field not in record:
        return "text"
    raise DataError(f"neither a chat ('{config.messages_field}'), a prompt/completion pair "
                    f"('{config.prompt_field}', '{config.completion_field}') nor plain text "
                    f"('{config.text_field}'); found keys {sorted(record)[:12]}. Name the fields with "
                    "--messages_field, --prompt_field/--completion_field, --prompt_template or --text_field")


def _string(record: dict, key: str, where: str, flag: str, allow_empty: bool = False) -> str:
    if key not in record:
        raise DataError(f"{where}: missing field '{key}' ({flag}); keys: {sorted(record)[:12]}")
    value = record[key]
    if not isinstance(value, str):
        raise DataError(f"{where}: field '{key}' must be a string, got {type(value).__name__}")
    if not allow_empty and not value.strip():
        raise DataError(f"{where}: field '{key}' is empty")
    return value


def _messages(record: dict, where: str, config) -> tuple[list[dict], str]:
    turns = record[config.messages_field]
    if not isinstance(turns, list) or not turns:
        raise DataError(f"{where}: field '{config.messages_field}' must be a non-empty list of "
                        "{role, content} objects")
    out = []
    for k, turn in enumerate(turns):
        if not isinstance(turn, dict) or "role" not in turn or "content" not in turn:
            raise DataError(f"{where}: {config.messages_field}[{k}] must be an object with 'role' and "
                            "'content'")
        if turn["role"] not in ROLES:
            raise DataError(f"{where}: {config.messages_field}[{k}].role is '{turn['role']}'; the chat "
                            f"templates kft renders know {', '.join(ROLES)}")
        if not isinstance(turn["content"], str):
            raise DataError(f"{where}: {config.messages_field}[{k}].content must be a string")
        out.append({"role": turn["role"], "content": turn["content"]})
    if out[-1]["role"] != "assistant":
        raise DataError(f"{where}: the last turn of '{config.messages_field}' is '{out[-1]['role']}'; it "
                        "must be the assistant's answer (the completion that is trained)")
    if not out[-1]["content"].strip():
        raise DataError(f"{where}: the final assistant turn (the completion) is empty")
    if len(out) < 2:
        raise DataError(f"{where}: '{config.messages_field}' holds only the assistant's answer; give at "
                        "least one user turn before it")
    return out[:-1], out[-1]["content"]


def parse(record: dict, form: str, where: str, config) -> Example:
    if form == "messages":
        if config.messages_field not in record:
            raise DataError(f"{where}: missing field '{config.messages_field}' (the file's first record "
                            "is a chat, so every record must be)")
        context, completion = _messages(record, where, config)
        return Example(context, completion, 0)
    completion_flag = "--completion_field"
    if form == "template":
        missing = [k for k in template_fields(config.prompt_template) if k not in record]
        if missing:
            raise DataError(f"{where}: --prompt_template reads field(s) {missing} that the record does not "
                            f"have; keys: {sorted(record)[:12]}")
        prompt = unescape(config.prompt_template).format(**record)
        completion = _string(record, config.completion_field, where, completion_flag)
        fields = template_fields(config.prompt_template)
        served = str(record[fields[0]]) if len(fields) == 1 else None
        return Example([{"role": "user", "content": prompt}], completion, 0, served)
    if form == "prompt_completion":
        prompt = _string(record, config.prompt_field, where, "--prompt_field")
        completion = _string(record, config.completion_field, where, completion_flag)
        return Example([{"role": "user", "content": prompt}], completion, 0)
    return Example([], _string(record, config.text_field, where, "--text_field"), 0)


def read_file(path: str, name: str, config, flag: str, form: str | None = None) -> Examples:
    """Every record of a JSONL file as an Example; `form` forces the format found in train."""
    if not path.endswith((".jsonl", ".json")):
        raise DataError(f"{path}: --task={config.task} reads JSONL files (one JSON object per line) ({flag})")
    text = _read_bytes(path, flag).decode("utf-8", errors="strict")
    examples = []
    for line, record in json_records(path, text):
        where = f"{path}:{line}"
        if form is None:
            try:
                form = detect_format(record, config)
            except DataError as e:
                raise DataError(f"{where}: {e}") from None
        example = parse(record, form, where, config)
        example.line = line
        examples.append(example)
    if not examples:
        raise DataError(f"{path}: no records ({flag})")
    return Examples(name, path, examples, form)


@dataclasses.dataclass
class LMData:
    """The splits of a generating task (causal_lm, seq2seq), as load_data returns them."""

    train: Examples
    eval: Examples
    test: Examples | None
    description: str
    model_dir: str = ""  # set by causal_lm's prepare(): the export writes the preset there


def load(config, task: str, formats: str, beam: bool, check=None) -> LMData:
    """load_data of a generating task: sampler flags the export cannot serve and data flags the task
    does not read are refused before any file is read (`formats`: what --train_file may hold); then
    `read_splits`, with `check`."""
    from kft.tasks.causal_lm import serving  # it reads this module

    try:  # refused before training, not at export after it
        serving.check_sampler(config, beam=beam)
    except serving.ExportError as e:
        raise FlagError(str(e)) from None
    if config.dataset:
        raise FlagError(f"--dataset (TFDS) is not read by --task={task}; give JSONL files with "
                        "--train_file / --eval_file")
    if not config.train_file:
        raise DataError(f"no training data: give --train_file (JSONL: {formats})")
    return LMData(*read_splits(config, check))


def read_splits(config, check=None) -> tuple[Examples, Examples, Examples | None, str]:
    """(train, eval, test, description) from --train_file / --eval_file / --test_file, read in the
    train file's format; without --eval_file a seeded --validation_fraction of train is held out.
    `check(train)` runs before the other files are read."""
    train = read_file(config.train_file, "train", config, "--train_file")
    if check is not None:
        check(train)
    eval_ = (read_file(config.eval_file, "eval", config, "--eval_file", train.format)
             if config.eval_file else None)
    test = (read_file(config.test_file, "test", config, "--test_file", train.format)
            if config.test_file else None)
    description = f"{config.train_file} ({train.format})"
    train = train.head(config.max_train_examples)
    if eval_ is None:
        held = max(1, int(round(config.validation_fraction * len(train))))
        if len(train) - held < 1:
            raise DataError(f"{config.train_file}: {len(train)} record(s) cannot be split into train and "
                            f"eval (--validation_fraction={config.validation_fraction} holds out {held}); "
                            "give --eval_file or more records")
        order = np.random.default_rng(config.seed).permutation(len(train))
        eval_, train = train.select(sorted(order[:held]), "eval"), train.select(sorted(order[held:]), "train")
        description += f" (eval = {held} held-out records)"
    return train, eval_.head(config.max_eval_examples), test, description
