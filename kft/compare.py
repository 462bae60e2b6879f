"""Two runs' generations side by side: `python -m kft.compare BEFORE.jsonl AFTER.jsonl`.

Reads the predictions.jsonl files of two --task=causal_lm runs on the same eval file (e.g. the
zero-shot run with --epochs=0 and the fine-tuned one) and prints each input with both answers and
the reference, then how many answers equal the reference in each run.
"""

from __future__ import annotations

import json
import sys
import textwrap


def read(path: str) -> list[dict]:
    try:
        with open(path, encoding="utf-8") as f:
            return [json.loads(line) for line in f if line.strip()]
    except FileNotFoundError:
        raise SystemExit(f"{path}: not found (a --task=causal_lm run writes it into its --model_dir)")
    except json.JSONDecodeError as e:
        raise SystemExit(f"{path}: not a predictions file ({e})")


def main(argv: list[str]) -> int:
    if len(argv) != 3:
        print(__doc__.strip().splitlines()[0], file=sys.stderr)
        return 2
    before, after = read(argv[1]), read(argv[2])
    by_line = {row["line"]: row for row in before}
    exact = {"before": 0, "after": 0}
    shown = 0
    for row in after:
        old = by_line.get(row["line"])
        if old is None:
            continue
        shown += 1
        print(f"--- {row.get('input') or row['prompt']}".strip())
        for name, r in (("before", old), ("after", row)):
            print(textwrap.indent(f"{name}: {r['prediction'].strip()}", "  "))
            exact[name] += r["prediction"].strip() == r["reference"].strip()
        print(f"  reference: {row['reference'].strip()}\n")
    print(f"{shown} prompts; answers equal to the reference: before {exact['before']}, after {exact['after']}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
