"""Benchmark: `python -m kft.bench --flagfile=flags/bench_sst2.cfg` (training), `--mode=serve`,
`--mode=compress --bench_dir=runs/compress` (the compression table, kft/compression/table.py),
`--mode=memory --flagfile=flags/bench_memory.cfg` (decoder LoRA memory by model size and its
projection to a Llama-3-8B shape, kft/benchmarks/memory.py).

Training mode runs kft's training path, keras-hub's documented recipe and the Hugging Face
Trainer on the same data and flags, each in a fresh process, then measures serving of kft's
export; it prints a table and writes bench.json and bench.png to --bench_dir. With
--task=question_answering (`--flagfile=flags/bench_squad.cfg`) the rows are kft and the Hugging
Face `run_qa` recipe, scored by SQuAD exact match and F1. With --task=causal_lm
(`--flagfile=flags/bench_dialogsum.cfg`) they are kft and the Hugging Face Trainer with PEFT, scored
by eval loss, ROUGE-L and BLEU, and serving is the decoder export's time to first token and decode
speed. Serve mode measures an existing export (--saved_model) alone. All kft.train flags apply.
"""

from __future__ import annotations

import json
import os
import sys
import time

STARTED = time.time()

from kft import startup  # noqa: E402

startup.quiet_environment()  # before anything imports TensorFlow

from absl import app, flags  # noqa: E402

from kft import config as config_lib  # noqa: E402
from kft.benchmarks import memory  # noqa: E402  (no TensorFlow at import)



def define_flags(flag_values: flags.FlagValues = flags.FLAGS) -> None:
    """kft.train's flags plus the benchmark's own."""
    config_lib.define_flags(flag_values)
    fv = flag_values
    flags.DEFINE_enum("mode", "train", ["train", "serve", "compress", "memory", "row"],
                      "train: all rows then serving; serve: --saved_model only; compress: the compression "
                      "table (flags/compress/); memory: decoder LoRA memory by size and its projection "
                      "(flags/bench_memory.cfg); row: one row (internal).", flag_values=fv)
    flags.DEFINE_list("compress_sets", ["sst2", "conll2003"], "With --mode=compress: the data sets of the "
                      "table, in this order.", flag_values=fv)
    flags.DEFINE_list("rows", ["kft", "keras_hub", "hf_trainer"], "Training rows to run, in this order "
                      "(--task=question_answering or causal_lm: kft, hf_trainer).",
                      flag_values=fv)
    flags.DEFINE_integer("baseline_max_steps", 40, "keras-hub recipe: train at most N steps, report the "
                         "time a full run implies; 0 = all.", flag_values=fv)
    flags.DEFINE_string("bench_dir", "runs/bench", "Where bench.json, bench.png, row logs and kft's export "
                        "go.", flag_values=fv)
    flags.DEFINE_string("saved_model", "", "Export folder measured by --mode=serve.", flag_values=fv)
    flags.DEFINE_integer("serve_requests", 300, "Timed batch-1 requests when measuring serving.",
                         flag_values=fv)
    flags.DEFINE_integer("serve_prompt_tokens", 0, "Decoder exports: serve each prompt cut to its first N "
                         "tokens (shorter ones left out); 0 = as the data gives them.", flag_values=fv)
    flags.DEFINE_string("row", "", "With --mode=row: which row this process runs.", flag_values=fv)
    flags.DEFINE_string("row_output", "", "With --mode=row: the JSON file the row's result goes to.",
                        flag_values=fv)
    memory.define_flags(fv)


FLAGS = flags.FLAGS


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments {argv[1:]}; every option is a --flag")
    if FLAGS.mode == "memory" or FLAGS.row.startswith("memory_"):
        return memory.main(FLAGS, STARTED)  # before TensorFlow: its Trainer rows never import it
    startup.import_tensorflow()
    from kft.benchmarks import rows as benchmark

    config = config_lib.from_flags(FLAGS)
    unknown = set(FLAGS.rows) - set(benchmark.ROWS)
    if unknown:
        raise app.UsageError(f"--rows: unknown {sorted(unknown)}; choose from {list(benchmark.ROWS)}")
    try:
        rows = benchmark.choose_rows(config.task, list(FLAGS.rows), FLAGS["rows"].present)
    except config_lib.FlagError as e:
        raise app.UsageError(str(e)) from None
    passed = [a for a in sys.argv[1:] if not a.startswith(("--mode=", "--row=", "--row_output="))]
    options = benchmark.Options(rows, FLAGS.baseline_max_steps, os.path.abspath(FLAGS.bench_dir),
                                FLAGS.saved_model, FLAGS.serve_requests, passed, FLAGS.serve_prompt_tokens)
    if FLAGS.mode == "row":
        result = benchmark.run_row(FLAGS.row, config, options, STARTED)
        with open(FLAGS.row_output, "w") as f:
            json.dump(result, f, indent=2, default=str)
        return 0
    try:
        if FLAGS.mode == "compress":
            from kft.compression import table

            report = table.run(list(FLAGS.compress_sets), os.path.abspath(FLAGS.bench_dir))
            print(table.markdown(report))
            print(f"\nwrote {os.path.join(FLAGS.bench_dir, 'compress.json')} and compress.md")
            return 0
        if FLAGS.mode == "serve":
            print(json.dumps(benchmark.run_serving(config, options), indent=2))
            return 0
        report = benchmark.run_training(config, options)
    except RuntimeError as e:  # a row failed; its log is named in the message
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(benchmark.table(report))
    print(f"\nwrote {os.path.join(options.bench_dir, 'bench.json')} and bench.png")
    return 0


def run():
    define_flags()  # here, not at import: tests import this module beside kft.train
    config_lib.declare_key_flags()
    app.run(main)


if __name__ == "__main__":
    run()
