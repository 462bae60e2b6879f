"""The flags reference (docs/flags.md), generated from the `Config` declarations.

One section per --helpfull group: each flag's default, the tasks that read it and its help, so
the page never disagrees with `kft.train --helpfull`. `make docs-flags` rewrites the file;
tests/test_config.py fails when it is out of date.
"""

from __future__ import annotations

import re
import sys

from kft import config as config_lib
from kft.exit_codes import EXIT_BAD_INPUT

# --flag and --flag=value mentions in help texts, shown as code.
_FLAG_MENTION = re.compile(r"(--[a-z][a-z0-9_]*(?:=[\w.-]*\w)?)")
# Characters that markdown or HTML would read in a table cell, and how they are written there.
_ESCAPES = (("\\", "\\\\"), ("|", "\\|"), ("*", "\\*"), ("_", "\\_"), ("<", "&lt;"), (">", "&gt;"))


def _escape(text: str) -> str:
    """Help text for a table cell: flag mentions as code, everything else escaped."""
    parts = _FLAG_MENTION.split(text)  # prose, mention, prose, mention, ..., prose
    for i in range(0, len(parts), 2):
        for char, escaped in _ESCAPES:
            parts[i] = parts[i].replace(char, escaped)
    for i in range(1, len(parts), 2):
        parts[i] = f"`{parts[i]}`"
    return "".join(parts)


def _default(value) -> str:
    """A default as it is written on the command line: true/false, a comma-separated list, "" for none."""
    if isinstance(value, bool):
        return f"`{str(value).lower()}`"
    if isinstance(value, list):
        value = ",".join(value)
    return f"`{value}`" if value not in (None, "") else '`""`'


def markdown() -> str:
    """docs/flags.md: one table per group (flag, default, applies to, help), in --helpfull order."""
    by_name = {f.name: f for f in config_lib.fields()}
    lines = ["# kft flags", "",
             "The run flags of `kft.train`, grouped as `python -m kft.train --helpfull` lists them. A flag "
             "that applies to some tasks only is refused with any other `--task` when set away from its "
             "default.", "",
             "Generated from the declarations in `kft/config.py` by `make docs-flags`; do not edit by hand."]
    for group, names in config_lib.GROUPS.items():
        lines += ["", f"## {group}", "", "| flag | default | applies to | help |", "|---|---|---|---|"]
        for name in names:
            field = by_name[name]
            tasks = field.metadata["tasks"]
            help_text = _escape(field.metadata["help"])
            if field.metadata["choices"]:
                help_text += " One of: " + ", ".join(f"`{c}`" for c in field.metadata["choices"]) + "."
            lines.append(f"| `--{name}` | {_default(config_lib.default(field))} | "
                         f"{', '.join(tasks) if tasks else 'all tasks'} | {help_text} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str]) -> int:
    """`python -m kft.flag_reference PATH` writes the reference to PATH (docs/flags.md)."""
    if len(argv) != 2:
        print("usage: python -m kft.flag_reference docs/flags.md", file=sys.stderr)
        return EXIT_BAD_INPUT
    with open(argv[1], "w") as f:
        f.write(markdown())
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
