"""Why did a fine-tuned run decide what it did? Integrated gradients per word, drawn and saved.

    python -m kft.explain --model_dir=runs/sst2 "a moving film" "a dull mess"
    python -m kft.explain --model_dir=runs/conll2003 --input_file=texts.txt   # one text per line
    python -m kft.explain --model_dir=runs/demo_llm "My order never arrived."  # --task=causal_lm

Writes <output_dir>/attributions.jsonl (the numbers), attributions.html (each word shaded: red
toward the explained output, blue against) and attributions.png; prints one JSON line per record.
Classification explains the predicted label (or --target); token classification explains each
word tagged with an entity tag (or --target); a decoder run explains the log-probability of the
completion it generates for the text as its prompt (or of the --target completion), toward the
words of the text. See kft/analysis/attributions.py for the method.
"""

from __future__ import annotations

import json
import os
import sys

from kft import startup

startup.quiet_environment()  # before anything imports TensorFlow

from absl import app, flags  # noqa: E402

FLAGS = flags.FLAGS

# 64 intervals left 2 of 10 SST-2 dev phrases above the 1% completeness gap on a fine-tuned MiniLM
# whose probabilities saturate (up to 2.4%); 128 brought all ten below 0.04% (README).
DEFAULT_IG_STEPS = 128
# A text still above the gap at 128 is refined by halving its intervals, up to this many: a zero-shot
# SmolLM2 explaining a DialogSum dialogue missed it by 1.46% at 128 (README).
DEFAULT_IG_MAX_STEPS = 1024


def define_flags() -> None:
    """Here, not at import: tests import kft modules beside kft.train's flags in one process."""
    flags.DEFINE_string("model_dir", "", "A finished kft run's --model_dir (its metrics.json and checkpoints).")
    flags.DEFINE_string("input_file", "", "Text file with one text per line (instead of arguments).")
    flags.DEFINE_integer("ig_steps", DEFAULT_IG_STEPS,
                         "Integration intervals along the path from the padding baseline.")
    flags.DEFINE_integer("ig_max_steps", DEFAULT_IG_MAX_STEPS,
                         "A text whose completeness gap is above 1% is redone with twice the intervals, up to this.")
    flags.DEFINE_string("target", "", "Explain this label (or tag; or completion, for a decoder run) "
                        "instead of the predicted (generated) one.")
    flags.DEFINE_string("output_dir", "", "Where the JSONL, HTML and PNG go; empty = <model_dir>/explain.")


def main(argv):
    startup.import_tensorflow()
    import tensorflow as tf
    from absl import logging

    from kft.analysis import attribution_report
    from kft.analysis import attributions
    from kft.training import runs
    import kft.tasks  # noqa: F401  (registers the tasks with the trainer)
    from kft.config import FlagError

    if not FLAGS.model_dir:
        raise app.UsageError("--model_dir is required (a finished kft run)")
    if FLAGS.ig_steps < 1:
        raise app.UsageError(f"--ig_steps={FLAGS.ig_steps}: must be at least 1")
    if FLAGS["ig_max_steps"].present and FLAGS.ig_max_steps < FLAGS.ig_steps:
        raise app.UsageError(f"--ig_max_steps={FLAGS.ig_max_steps}: must be at least --ig_steps={FLAGS.ig_steps} "
                             "(equal: no refinement)")
    max_steps = max(FLAGS.ig_max_steps, FLAGS.ig_steps)  # --ig_steps above the default cap: no refinement
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
        records = attribution_report.explain(run, texts, FLAGS.ig_steps, FLAGS.target, max_steps)
    except FlagError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    for r in records:
        if r["completeness_error"] > attributions.COMPLETENESS_TOLERANCE:
            logging.warning("%r: attributions sum to %.5f but f(input) - f(baseline) = %.5f (gap %.2f%% > "
                            "%.0f%% at %d intervals): raise --ig_max_steps", r["text"][:60], r["attribution_sum"],
                            r["f_input"] - r["f_baseline"], 100 * r["completeness_error"],
                            100 * attributions.COMPLETENESS_TOLERANCE, r["ig_steps"])
    refined = [r["ig_steps"] for r in records if r["ig_steps"] > FLAGS.ig_steps]
    if refined:
        logging.info("%d of %d record(s) were above the %.0f%% gap at %d intervals and refined (to %s)",
                     len(refined), len(records), 100 * attributions.COMPLETENESS_TOLERANCE, FLAGS.ig_steps,
                     ", ".join(map(str, refined)))
    output_dir = FLAGS.output_dir or os.path.join(FLAGS.model_dir, "explain")
    paths = attribution_report.write(records, output_dir, f"{run.config.task}: {os.path.basename(FLAGS.model_dir.rstrip('/'))}")
    for r in records:
        print(json.dumps({k: r[k] for k in r if k not in ("words",)}
                         | {"words": [[w["word"], round(w["attribution"], 5)] for w in r["words"]]},
                         ensure_ascii=False))
    print(f"wrote {paths['jsonl']}, {paths['html']} and {paths['png']}", file=sys.stderr)
    return 0


def run():
    define_flags()
    app.run(main)


if __name__ == "__main__":
    run()
