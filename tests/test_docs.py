"""The documentation stays true to the code: the README's length, every documented command's flags,
and every relative link.

Commands. Every line in a fenced code block of README.md, docs/*.md and flags/README.md that runs
`python -m kft.<entry>` (any python: `python`, `python3`, `.venv/bin/python`; a `/usr/bin/time -v`
in front is fine) is a documented command. Lines ending in `\\` continue on the next line, and `#`
starts a comment. The command's arguments are parsed the way its entry point parses them, without
training anything: each entry point is imported in a subprocess of its own (two entry points in one
process clash: both define kft's flags), its flags are defined as its `run()` defines them, and each
command's argv is parsed into absl's FLAGS. A command fails when

- a flag is unknown or its value does not parse (absl's errors), or a `--flagfile` does not exist
  relative to the repository root (nested flagfiles are read by absl from the root too);
- `kft.train`, `kft.bench` or `kft.tune` get positional arguments (their `main` refuses them);
  `kft.predict` lacks `--model`, `kft.explain` lacks `--model_dir`; `kft.compare` is not given
  exactly two files;
- a flag is set that the chosen `--task` does not read (`kft.config.check_task_flags`, which
  `kft.train` and `kft.tune` apply before training; `kft.bench --mode=train` hands its flags to
  `kft.train` for its kft row, so it is checked the same way); for `kft.tune`, the `--search`
  specs must parse (`kft.tune.parse_space`, which its `main` runs before any trial);
- the line holds shell syntax beyond one plain command (`$`, `;`, `&&`, `|`, redirections): write
  documented commands out in full.

Placeholders, written `<...>` (for example `--saved_model=<export>`), follow these rules:

1. a placeholder as a flag's value: the flag's name is checked, its value is not (counted in
   PLACEHOLDER_VALUES);
2. a placeholder as a positional argument (texts for kft.predict or kft.explain): nothing to check;
3. a placeholder in a `--flagfile` path or in a flag's name: the command cannot be checked and is
   skipped; the skips are listed and their number is held to MAX_SKIPPED.

absl's own help flags (`--help`, `--helpfull`, `--helpshort`, `--helpxml`), which `app.run` defines,
are accepted as they are.
"""

from __future__ import annotations

import dataclasses
import json
import pathlib
import re
import shlex
import subprocess
import sys

import pytest

REPO = pathlib.Path(__file__).resolve().parents[1]
README_MAX_LINES = 250
ENTRY_POINTS = ("train", "predict", "bench", "tune", "explain", "compare")
POSITIONAL_REFUSED = ("train", "bench", "tune")
HELP_FLAGS = ("--help", "--helpfull", "--helpshort", "--helpxml", "-?")
SHELL_SYNTAX = ("$", ";", "&&", "||", "|", ">", "<", "`")
PLACEHOLDER = re.compile(r"<[^<>]+>")
MAX_SKIPPED = 3  # rule 3 above: commands that cannot be checked at all
MAX_PLACEHOLDER_VALUES = 10  # rule 1 above: flag values that are not checked


def doc_files() -> list[pathlib.Path]:
    return [REPO / "README.md", *sorted((REPO / "docs").glob("*.md")), REPO / "flags" / "README.md"]


@dataclasses.dataclass
class Command:
    where: str  # file:line
    text: str
    entry: str = ""
    args: list = dataclasses.field(default_factory=list)
    problem: str = ""  # found before parsing: shell syntax, a missing flagfile, ...
    skipped: str = ""  # why it cannot be checked (rule 3)


def fenced_lines(path: pathlib.Path):
    """(line number, logical line) of every fenced block, continuation lines joined."""
    inside, pending, start = False, "", 0
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if line.lstrip().startswith("```"):
            inside, pending = not inside, ""
            continue
        if not inside:
            continue
        if not pending:
            start = number
        if line.rstrip().endswith("\\"):
            pending += line.rstrip()[:-1] + " "
            continue
        yield start, pending + line
        pending = ""


def _is_python(token: str) -> bool:
    return re.fullmatch(r"(.*/)?python(3(\.\d+)?)?", token) is not None


def parse_command(where: str, line: str) -> Command | None:
    """The documented command on `line`, or None when the line runs no `python -m kft.<entry>`."""
    if "-m kft." not in line:
        return None
    command = Command(where, line.strip())
    try:
        tokens = shlex.split(line, comments=True)
    except ValueError as e:
        command.problem = f"does not split as a shell line: {e}"
        return command
    starts = [i for i in range(1, len(tokens) - 1)
              if tokens[i] == "-m" and tokens[i + 1].startswith("kft.") and _is_python(tokens[i - 1])]
    if not starts:
        return None  # e.g. prose that mentions `-m kft.` inside a code block's comment
    i = starts[0]
    command.entry, command.args = tokens[i + 1][len("kft."):], tokens[i + 2:]
    if command.entry not in ENTRY_POINTS:
        command.problem = f"kft.{command.entry} is not an entry point ({', '.join(ENTRY_POINTS)})"
    elif any(s in line.split("#")[0] for s in ("$", "`")) or any(t in SHELL_SYNTAX for t in command.args):
        command.problem = "shell syntax beyond one plain command: write the command out in full"
    for arg in command.args:
        name, _, value = arg.partition("=")
        if PLACEHOLDER.search(name) or (name == "--flagfile" and PLACEHOLDER.search(value)):
            command.skipped = f"placeholder in {arg!r} (rule 3)"
        elif name == "--flagfile" and not (REPO / value).is_file():
            command.problem = f"--flagfile={value}: no such file in the repository"
    return command


def documented_commands() -> list[Command]:
    found = []
    for path in doc_files():
        for number, line in fenced_lines(path):
            command = parse_command(f"{path.relative_to(REPO)}:{number}", line)
            if command is not None:
                found.append(command)
    return found


# Runs in a fresh interpreter per entry point: reads [[arg, ...], ...] on stdin, prints one JSON result
# per command ({"error": ..., "placeholders": n}).
CHECKER = r"""
import importlib, json, re, sys
entry = sys.argv[1]
commands = json.load(sys.stdin)
from absl import flags
FLAGS = flags.FLAGS
module = importlib.import_module("kft." + entry)
define = getattr(module, "define_flags", None)  # bench, tune, explain define theirs in run()
if define is not None:
    try:
        define()
    except flags.DuplicateFlagError:  # already defined at import
        pass
from kft import config as config_lib
PLACEHOLDER = re.compile(r"<[^<>]+>")
HELP = set(sys.argv[2].split(","))
results = []
for args in commands:
    FLAGS.unparse_flags()
    placeholders = 0
    try:
        kept = []
        for arg in args:
            name, _, value = arg.partition("=")
            if arg in HELP:
                continue
            if name.startswith("--") and PLACEHOLDER.search(value):  # rule 1: the name alone
                if name[2:] not in FLAGS:
                    raise flags.UnrecognizedFlagError(name[2:], arg)
                placeholders += 1
                continue
            kept.append(arg)
        positional = FLAGS(["kft." + entry, *kept])[1:]
        if entry in ("train", "bench", "tune") and positional:
            raise ValueError(f"unexpected arguments {positional}; kft.{entry} takes every option as a --flag")
        if entry == "predict" and not FLAGS.model and not placeholders:
            raise ValueError("--model is required")
        if entry == "explain" and not FLAGS.model_dir and not placeholders:
            raise ValueError("--model_dir is required")
        if entry in ("train", "tune") or (entry == "bench" and FLAGS.mode == "train"):
            config = config_lib.from_flags(FLAGS)
            config_lib.check_task_flags(config)
            if entry == "tune" and hasattr(module, "parse_space"):
                module.parse_space(FLAGS.search, config)
        results.append({"error": "", "placeholders": placeholders})
    except Exception as e:  # noqa: BLE001  reported per command
        results.append({"error": f"{type(e).__name__}: {e}", "placeholders": placeholders})
print(json.dumps(results))
"""


def check_entry_point(entry: str, commands: list[Command]) -> list[dict]:
    if entry == "compare":  # no flags: BEFORE.jsonl AFTER.jsonl
        return [{"error": "" if len(c.args) == 2 and not any(a.startswith("-") for a in c.args)
                 else "kft.compare takes exactly two predictions files", "placeholders": 0} for c in commands]
    done = subprocess.run([sys.executable, "-c", CHECKER, entry, ",".join(HELP_FLAGS)], cwd=REPO,
                          input=json.dumps([c.args for c in commands]), capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0, f"the checker for kft.{entry} failed:\n{done.stderr[-3000:]}"
    results = json.loads(done.stdout.strip().splitlines()[-1])
    assert len(results) == len(commands)
    return results


def test_the_readme_is_at_most_250_lines():
    lines = (REPO / "README.md").read_text(encoding="utf-8").splitlines()
    assert len(lines) <= README_MAX_LINES, f"README.md has {len(lines)} lines; move detail into docs/"


def test_the_readme_test_command_is_make_test():
    """CI runs the README's test command."""
    assert re.search(r"^make test\b", (REPO / "README.md").read_text(encoding="utf-8"), re.M)


@pytest.mark.slow  # a subprocess per entry point
def test_every_documented_command_parses_as_its_entry_point_would():
    commands = documented_commands()
    assert len(commands) > 50, "the extraction found too few commands; has the fence syntax changed?"
    failures = [f"{c.where}: {c.text}\n    {c.problem}" for c in commands if c.problem]
    checked = [c for c in commands if not c.problem and not c.skipped]
    skipped = [f"{c.where}: {c.text} ({c.skipped})" for c in commands if c.skipped]
    placeholders = 0
    for entry in ENTRY_POINTS:
        group = [c for c in checked if c.entry == entry]
        if not group:
            continue
        for command, result in zip(group, check_entry_point(entry, group)):
            placeholders += result["placeholders"]
            if result["error"]:
                failures.append(f"{command.where}: {command.text}\n    {result['error']}")
    assert not failures, "documented commands that kft would refuse:\n" + "\n".join(failures)
    assert len(skipped) <= MAX_SKIPPED, "too many commands that cannot be checked:\n" + "\n".join(skipped)
    assert placeholders <= MAX_PLACEHOLDER_VALUES, f"{placeholders} flag values are placeholders"


def test_the_extraction_follows_its_rules():
    """Continuations, comments, placeholders, shell syntax and flagfiles, on made-up lines."""
    c = parse_command("x:1", "  .venv/bin/python -m kft.train --flagfile=flags/demo.cfg --epochs=1  # note")
    assert (c.entry, c.args, c.problem, c.skipped) == ("train", ["--flagfile=flags/demo.cfg", "--epochs=1"], "", "")
    assert "no such file" in parse_command("x:1", "python -m kft.train --flagfile=flags/nope.cfg").problem
    assert "rule 3" in parse_command("x:1", "python -m kft.train --flagfile=<yours>.cfg").skipped
    assert "shell syntax" in parse_command("x:1", "python -m kft.train --l2sp_weight=$w").problem
    assert "shell syntax" in parse_command("x:1", "python -m kft.train --epochs=1 && echo done").problem
    assert "not an entry point" in parse_command("x:1", "python -m kft.training.loop").problem
    assert parse_command("x:1", '{"text": "a moving film"}') is None
    doc = REPO / "tests" / "__docs_probe__.md"
    try:
        doc.write_text("```bash\npython -m kft.predict --model=m \\\n  \"a b\"\n```\n", encoding="utf-8")
        assert list(fenced_lines(doc)) == [(2, 'python -m kft.predict --model=m    "a b"')]
    finally:
        doc.unlink()


@pytest.mark.slow  # a subprocess
def test_the_checker_refuses_what_the_entry_points_refuse():
    cases = [Command("x", "", "train", ["--flagfile=flags/demo.cfg", "--epochs=1"]),
             Command("x", "", "train", ["--no_such_flag=1"]),
             Command("x", "", "train", ["--epochs=one"]),
             Command("x", "", "train", ["--crf"]),  # token classification only
             Command("x", "", "train", ["a text"]),
             Command("x", "", "train", ["--saved_model=<export>"]),  # a placeholder keeps its name checked
             Command("x", "", "train", ["--helpfull"])]
    errors = [r["error"] for r in check_entry_point("train", cases)]
    assert errors[0] == "" and errors[6] == "", errors
    assert all(errors[1:6]), errors


LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)(?:\s+\"[^\"]*\")?\)")


def test_every_relative_link_points_to_an_existing_file():
    broken = []
    for path in doc_files():
        text = re.sub(r"```.*?```", "", path.read_text(encoding="utf-8"), flags=re.S)  # links in code are not links
        for target in LINK.findall(text):
            if re.match(r"[a-z][a-z0-9+.-]*:", target) or target.startswith("#"):
                continue  # a URL, or an anchor in the same page
            file = target.split("#")[0]
            if not (path.parent / file).exists():
                broken.append(f"{path.relative_to(REPO)}: {target}")
    assert not broken, "links to missing files:\n" + "\n".join(broken)
