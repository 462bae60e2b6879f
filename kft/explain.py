"""Why did a fine-tuned run decide what it did? Integrated gradients per word, drawn and saved.

    python -m kft.explain --model_dir=runs/sst2 "a moving film" "a dull mess"
    python -m kft.explain --model_dir=runs/conll2003 --input_file=texts.txt   # one text per line

Writes <output_dir>/attributions.jsonl (the numbers), attributions.html (each word shaded: red
toward the explained output, blue against) and attributions.png; prints one JSON line per record.
Classification explains the predicted label (or --target); token classification explains each
word tagged with an entity tag (or --target). See kft/attributions.py for the method.
"""

from __future__ import annotations

import json
import os
import sys

from kft import startup

startup.quiet_environment()  # before anything imports TensorFlow

from absl import app, flags  # noqa: E402

flags.DEFINE_string("model_dir", "", "A finished kft run's --model_dir (its metrics.json and checkpoints).")
flags.DEFINE_string("input_file", "", "Text file with one text per line (instead of arguments).")
flags.DEFINE_integer("ig_steps", 64, "Integration intervals along the path from the padding baseline.")
flags.DEFINE_string("target", "", "Explain this label (or tag) instead of the predicted one.")
flags.DEFINE_string("output_dir", "", "Where the JSONL, HTML and PNG go; empty = <model_dir>/explain.")
FLAGS = flags.FLAGS

# A text whose attributions miss f(input) - f(baseline) by more than this gets a warning.
COMPLETENESS_TOLERANCE = 0.01
EXPLAINABLE = ("classification", "token_classification")


def explain(run, texts: list[str], steps: int, target: str = "") -> list[dict]:
    if run.config.task == "classification":
        from kft.tasks.classification import explain as task_explain
    elif run.config.task == "token_classification":
        from kft.tasks.token_classification import explain as task_explain
    else:
        from kft.config import FlagError

        raise FlagError(f"--model_dir={run.path}: kft.explain covers --task={' and '.join(EXPLAINABLE)}; "
                        f"this run is --task={run.config.task}")
    return task_explain.explain(run, texts, steps, target)


def write(records: list[dict], output_dir: str, heading: str) -> dict:
    import tensorflow as tf

    from kft import attribution_report

    tf.io.gfile.makedirs(output_dir)
    paths = {k: os.path.join(output_dir, f"attributions.{k}") for k in ("jsonl", "html", "png")}
    with tf.io.gfile.GFile(paths["jsonl"], "w") as f:
        f.write("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records))
    with tf.io.gfile.GFile(paths["html"], "w") as f:
        f.write(attribution_report.page(records, heading))
    attribution_report.image(records, paths["png"], heading)
    return paths


def main(argv):
    startup.import_tensorflow()
    import tensorflow as tf
    from absl import logging

    from kft import runs
    from kft.config import FlagError

    if not FLAGS.model_dir:
        raise app.UsageError("--model_dir is required (a finished kft run)")
    if FLAGS.ig_steps < 1:
        raise app.UsageError(f"--ig_steps={FLAGS.ig_steps}: must be at least 1")
    texts = list(argv[1:])
    if FLAGS.input_file:
        if texts:
            raise app.UsageError("give texts as arguments or --input_file, not both")
        if not tf.io.gfile.exists(FLAGS.input_file):
            raise app.UsageError(f"--input_file={FLAGS.input_file}: no such file")
        with tf.io.gfile.GFile(FLAGS.input_file) as f:
            texts = [line.rstrip("\n") for line in f if line.strip()]
    if not texts:
        raise app.UsageError("no texts: pass them as arguments or with --input_file")
    try:
        run = runs.load_run(FLAGS.model_dir)
        records = explain(run, texts, FLAGS.ig_steps, FLAGS.target)
    except FlagError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    for r in records:
        if r["completeness_error"] > COMPLETENESS_TOLERANCE:
            logging.warning("%r: attributions sum to %.5f but f(input) - f(baseline) = %.5f (gap %.2f%% > "
                            "%.0f%%): raise --ig_steps", r["text"][:60], r["attribution_sum"],
                            r["f_input"] - r["f_baseline"], 100 * r["completeness_error"],
                            100 * COMPLETENESS_TOLERANCE)
    output_dir = FLAGS.output_dir or os.path.join(FLAGS.model_dir, "explain")
    paths = write(records, output_dir, f"{run.config.task}: {os.path.basename(FLAGS.model_dir.rstrip('/'))}")
    for r in records:
        print(json.dumps({k: r[k] for k in r if k not in ("words",)}
                         | {"words": [[w["word"], round(w["attribution"], 5)] for w in r["words"]]},
                         ensure_ascii=False))
    print(f"wrote {paths['jsonl']}, {paths['html']} and {paths['png']}", file=sys.stderr)
    return 0


def run():
    app.run(main)


if __name__ == "__main__":
    run()
