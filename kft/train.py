"""Fine-tune a backbone: `python -m kft.train --flagfile=flags/sst2.cfg` (see --helpfull)."""

from __future__ import annotations

import json
import sys

from kft import startup

startup.quiet_environment()  # before anything imports TensorFlow

from absl import app, flags, logging  # noqa: E402

from kft import config as config_lib  # noqa: E402
from kft.exit_codes import EXIT_BAD_INPUT, EXIT_DIVERGED, EXIT_INTERRUPTED, EXIT_PREEMPTED  # noqa: E402

config_lib.define_flags()
config_lib.declare_key_flags()  # so --help lists them, not only --helpfull
FLAGS = flags.FLAGS


def _fail(error: Exception, status: int, prefix: str = "error") -> int:
    """One line on stderr (absl's log goes there too: logging it as well printed it twice), and the
    log file when absl writes one (--log_dir)."""
    if logging.get_absl_handler().python_handler.stream is not sys.stderr:
        logging.error("%s", error)
    print(f"{prefix}: {error}", file=sys.stderr)
    return status


# What the final JSON line reports per split: classification, token-classification, then decoder scores.
SUMMARY = ("accuracy", "macro_precision", "macro_recall", "macro_f1", "entity_precision", "entity_recall",
           "entity_f1", "token_accuracy", "loss", "perplexity", "rouge1", "rouge2", "rougeL", "bleu",
           "exact_match", "f1")


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments {argv[1:]}; every option is a --flag")
    startup.import_tensorflow()
    from kft.models import backbones
    from kft.training import checkpoints
    from kft.data import sources as data
    from kft.training import loop
    from kft.training import trainer
    import kft.tasks  # noqa: F401  (registers the tasks with the trainer)

    config = config_lib.from_flags(FLAGS)
    model_dir = trainer.default_model_dir(config)
    try:
        result = trainer.train_and_evaluate(config, model_dir)
    except (data.DataError, backbones.BackboneError, config_lib.FlagError,
            checkpoints.CheckpointError) as e:
        return _fail(e, EXIT_BAD_INPUT)
    except loop.Diverged as e:
        return _fail(e, EXIT_DIVERGED)
    except loop.Preempted as e:
        return _fail(e, EXIT_PREEMPTED, "interrupted" if "Ctrl-C" in str(e) else "preempted")
    except KeyboardInterrupt:  # a Ctrl-C outside training, or a second one during it
        steps = checkpoints.list_steps(f"{model_dir}/checkpoints")
        saved = f"the last checkpoint is step {max(steps)}" if steps else "no checkpoint was written"
        print(f"interrupted: stopped at once; {saved} in {model_dir}/checkpoints; rerun the same command "
              "to continue", file=sys.stderr)
        return EXIT_INTERRUPTED
    summary = {"model_dir": model_dir, "export": result.get("export")}
    for split in ("eval", "test"):
        if split in result:
            summary[split] = {k: round(result[split][k], 4) for k in SUMMARY if k in result[split]}
    summary["train_seconds"] = result["training"]["train_seconds"]
    print(json.dumps(summary, indent=2))
    return 0


def run():
    app.run(main)


if __name__ == "__main__":
    run()
