"""Fine-tune a backbone: `python -m kft.train --flagfile=flags/sst2.cfg` (see --helpfull)."""

from __future__ import annotations

import json
import os
import sys

os.environ.setdefault("KERAS_BACKEND", "tensorflow")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from absl import app, flags, logging  # noqa: E402

from kft import config as config_lib  # noqa: E402

config_lib.define_flags()
flags.adopt_module_key_flags(config_lib)  # so --help lists them, not only --helpfull
FLAGS = flags.FLAGS



def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments {argv[1:]}; every option is a --flag")
    from kft import backbones, data, trainer

    config = config_lib.from_flags(FLAGS)
    model_dir = trainer.default_model_dir(config)
    try:
        result = trainer.train_and_evaluate(config, model_dir)
    except (data.DataError, backbones.BackboneError, config_lib.FlagError) as e:
        logging.error("%s", e)
        print(f"error: {e}", file=sys.stderr)
        return 2
    summary = {"model_dir": model_dir, "export": result.get("export")}
    for split in ("eval", "test"):
        if split in result:
            summary[split] = {k: round(result[split][k], 4)
                              for k in ("accuracy", "macro_precision", "macro_recall", "macro_f1")}
    summary["train_seconds"] = result["training"]["train_seconds"]
    print(json.dumps(summary, indent=2))
    return 0


def run():
    app.run(main)


if __name__ == "__main__":
    run()
