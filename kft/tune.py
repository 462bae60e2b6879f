"""Hyperparameter search over kft runs: `python -m kft.tune --flagfile=space.cfg --trials=20
--tune_dir=runs/tune` (Optuna; `pip install kft[tune]`).

Every kft.train flag sets the base run; each repeated --search (name:distribution:arguments) is a
flag Optuna draws per trial. Each trial is a normal kft run (trainer.fit_model) in
<tune_dir>/trials/<number>, scored by the eval split's headline metric (--tune_metric), and
stopped at an epoch end when its score falls below the median of earlier trials' at that epoch
(Optuna's MedianPruner). The study is kept in <tune_dir>/study.db, so rerunning the same command
after an interruption continues the search; a trial the interruption cut short is marked failed
and its flags are tried again. After every trial the table of trials (<tune_dir>/trials.json,
printed at the end), the best trial's flags (<tune_dir>/best.cfg, a flagfile for kft.train) and
<tune_dir>/search.png are rewritten.
"""

from __future__ import annotations

import dataclasses
import difflib
import gc
import json
import math
import os
import shutil
import sys
import warnings

from kft import startup

startup.quiet_environment()  # before anything imports TensorFlow

from absl import app, flags, logging  # noqa: E402

from kft import config as config_lib  # noqa: E402
from kft.config import Config, FlagError  # noqa: E402
from kft.exit_codes import EXIT_BAD_INPUT, EXIT_INTERRUPTED, EXIT_PREEMPTED  # noqa: E402

FLAGS = flags.FLAGS
TUNE_FLAGS = ("search", "trials", "timeout", "tune_dir", "tune_metric", "prune_trials", "prune_startup_trials")

DISTRIBUTIONS = ("loguniform", "uniform", "int", "choice")
# The score maximized by default: the eval split's headline metric ("-" = minus, lower is better).
DEFAULT_METRICS = {"classification": "accuracy", "token_classification": "entity_f1",
                   "question_answering": "f1", "causal_lm": "-loss", "seq2seq": "-loss"}
# Flags drawn only when the trial's method reads them (define-by-run): a LoRA rank is never
# drawn for a full fine-tuning trial.
METHOD_ONLY = {"lora_rank": "lora", "lora_alpha": "lora", "num_prompt_tokens": "prompt",
               "prefix_length": "prefix", "prefix_projection": "prefix", "freeze_layers": "freeze"}
# Where a trial's files go and what its score means are the search's, not a trial's, to choose.
NOT_SEARCHABLE = ("task", "model_dir", "run_name")
TYPES = {"int": int, "float": float, "bool": bool, "str": str}


def define_flags(flag_values: flags.FlagValues = flags.FLAGS) -> None:
    """kft.train's flags (the base run of every trial) plus the search's own, grouped as "kft: tune"."""
    config_lib.define_flags(flag_values)
    where = {"flag_values": flag_values, "module_name": "kft: tune"}
    flags.DEFINE_multi_string("search", [], "A searched flag, repeatable: name:loguniform:LOW:HIGH, "
                              "name:uniform:LOW:HIGH, name:int:LOW:HIGH or name:choice:A,B,...; none = "
                              "learning_rate around the method's default (/4..x4), epochs 1..max(3, --epochs).", **where)
    flags.DEFINE_integer("trials", 20, "Trials to finish (completed or pruned), counting those of an "
                         "earlier, interrupted run of the same search.", **where)
    flags.DEFINE_integer("timeout", 0, "Start no new trial after this many seconds; 0 = no limit.", **where)
    flags.DEFINE_string("tune_dir", "runs/tune", "Local folder of the study (study.db), the trials' "
                        "model_dirs (trials/<n>), trials.json, best.cfg and search.png.", **where)
    flags.DEFINE_string("tune_metric", "", "Eval metric maximized (a key of metrics.json's eval, '-' "
                        "in front = minimized); empty = accuracy, entity_f1, f1 or -loss by --task.", **where)
    flags.DEFINE_bool("prune_trials", True, "Stop a trial at an epoch end when its eval score is below the "
                      "median of earlier trials' at that epoch (never at its last epoch).", **where)
    flags.DEFINE_integer("prune_startup_trials", 3, "With --prune_trials: trials finished before any "
                         "trial is stopped early.", **where)


# -- the search space -----------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Param:
    """One --search entry: a Config field and the distribution its values are drawn from."""

    name: str
    kind: str  # one of DISTRIBUTIONS
    low: float = 0
    high: float = 0
    choices: tuple = ()
    spec: str = ""  # the --search value, for messages and the study's record

    def suggest(self, trial):
        if self.kind == "choice":
            return trial.suggest_categorical(self.name, list(self.choices))
        if isinstance(self.low, int):
            return trial.suggest_int(self.name, self.low, self.high, log=self.kind == "loguniform")
        return trial.suggest_float(self.name, self.low, self.high, log=self.kind == "loguniform")


def _cast(text: str, kind: type, spec: str):
    try:
        if kind is bool:
            if text.lower() not in ("true", "false"):
                raise ValueError
            return text.lower() == "true"
        return kind(text)
    except ValueError:
        raise FlagError(f"--search={spec}: {text!r} is not a {kind.__name__}") from None


def parse_search(spec: str, base: Config) -> Param:
    """`name:distribution:arguments` as a Param, its values cast to the field's type; a FlagError
    naming `spec` when the name, distribution or bounds are wrong."""
    parts = spec.split(":", 2)
    if len(parts) != 3 or not all(parts):
        raise FlagError(f"--search={spec}: expected name:distribution:arguments, e.g. "
                        "learning_rate:loguniform:1e-5:1e-3 or batch_size:choice:16,32")
    name, kind, args = parts
    fields = {f.name: f for f in config_lib.fields()}
    if name not in fields:
        close = difflib.get_close_matches(name, fields, n=1)
        raise FlagError(f"--search={spec}: {name!r} is not a kft flag"
                        + (f" (did you mean {close[0]}?)" if close else ""))
    if name in NOT_SEARCHABLE:
        raise FlagError(f"--search={spec}: --{name} cannot be searched (it is the same for every trial)")
    field = fields[name]
    if field.type not in TYPES:
        raise FlagError(f"--search={spec}: --{name} is a list flag and cannot be searched")
    tasks = config_lib.TASK_ONLY.get(name)
    if tasks and base.task not in tasks:
        raise FlagError(f"--search={spec}: --{name} applies to --task={' or --task='.join(tasks)}, not "
                        f"--task={base.task}")
    value_type = TYPES[field.type]
    if kind == "choice":
        values = tuple(_cast(v.strip(), value_type, spec) for v in args.split(","))
        allowed = field.metadata["choices"]
        wrong = [v for v in values if allowed and v not in allowed]
        if wrong:
            raise FlagError(f"--search={spec}: --{name} takes {', '.join(allowed)}, not {wrong[0]}")
        if len(set(values)) != len(values):
            raise FlagError(f"--search={spec}: a value is listed twice")
        return Param(name, kind, choices=values, spec=spec)
    if kind not in DISTRIBUTIONS:
        raise FlagError(f"--search={spec}: unknown distribution {kind!r}; use one of {', '.join(DISTRIBUTIONS)}")
    if value_type not in (int, float) or field.metadata["choices"]:
        raise FlagError(f"--search={spec}: --{name} takes no numeric range; use {name}:choice:A,B,...")
    if (kind == "int") != (value_type is int) and kind != "loguniform":
        raise FlagError(f"--search={spec}: --{name} is {'an integer' if value_type is int else 'a float'}; "
                        f"use {'int' if value_type is int else 'uniform or loguniform'}")
    bounds = args.split(":")
    if len(bounds) != 2:
        raise FlagError(f"--search={spec}: {kind} takes LOW:HIGH")
    low, high = (_cast(b, value_type, spec) for b in bounds)
    if not low < high:
        raise FlagError(f"--search={spec}: LOW must be below HIGH")
    if kind == "loguniform" and low <= 0:
        raise FlagError(f"--search={spec}: loguniform needs LOW > 0")
    return Param(name, kind, low, high, spec=spec)


def parse_space(specs: list[str], base: Config) -> list[Param]:
    """The --search values as Params, --method first (the method decides which others are drawn)."""
    space = [parse_search(spec, base) for spec in specs]
    names = [p.name for p in space]
    for name in names:
        if names.count(name) > 1:
            twice = ", ".join(p.spec for p in space if p.name == name)
            raise FlagError(f"--search: --{name} is searched twice ({twice})")
    space.sort(key=lambda p: p.name != "method")
    methods = set(space[0].choices) if names and space[0].name == "method" else {base.method}
    for p in space:
        needs = METHOD_ONLY.get(p.name)
        if needs and needs not in methods:
            raise FlagError(f"--search={p.spec}: --{p.name} applies with --method={needs} only; give "
                            f"--method={needs} or search method with {needs} among its choices")
    return space


def default_space(base: Config) -> list[Param]:
    """Without --search: the learning rate around the method's default (or the given rate) and epochs."""
    from kft.training import optim

    rate, _ = optim.peak_learning_rate(base)
    return parse_space([f"learning_rate:loguniform:{rate / 4:.6g}:{rate * 4:.6g}",
                        f"epochs:int:1:{max(3, base.epochs)}"], base)


def suggest(trial, space: list[Param], base: Config) -> dict:
    """The trial's flags: each Param drawn, skipping method-specific ones its method does not read."""
    chosen = {}
    for p in space:
        needs = METHOD_ONLY.get(p.name)
        if needs and chosen.get("method", base.method) != needs:
            continue
        chosen[p.name] = p.suggest(trial)
    return chosen


# -- one trial ------------------------------------------------------------------------------------


def epoch_hook(trial, epochs: int, metric: str = ""):
    """Loop.epoch_hook for `trial`: reports each epoch-end score and stops the run when the
    pruner says so; never after the last epoch, whose final score is already paid for. The score
    is `metric` from the epoch's eval scores where they have it (entity F1 for tagging, not the
    token accuracy), else the run's own epoch score."""
    import optuna

    def report(epoch: int, score: float, scores: dict | None = None) -> None:
        if metric and scores and metric.lstrip("-") in scores:
            score = metric_value(scores, metric)
        trial.report(score, epoch)
        if epoch < epochs and trial.should_prune():
            trial.set_user_attr("note", f"pruned after epoch {epoch} (score {score:.4f})")
            raise optuna.TrialPruned(f"epoch {epoch}: score {score:.4f} below the median of earlier trials")

    return report


def metric_value(report: dict, metric: str) -> float:
    """The score maximized: `metric` from the eval report, negated when it starts with '-'."""
    key = metric.lstrip("-")
    if key not in report:
        numeric = sorted(k for k, v in report.items() if isinstance(v, (int, float)))
        raise FlagError(f"--tune_metric={metric}: the eval report has no {key!r}; it has {', '.join(numeric)}")
    value = float(report[key])
    return -value if metric.startswith("-") else value


@dataclasses.dataclass
class Options:
    tune_dir: str
    trials: int
    timeout: float  # seconds; 0 = none
    metric: str
    prune_trials: bool
    prune_startup_trials: int
    given: frozenset  # Config fields given on the command line or in a flagfile
    command: str  # how the search was started, for best.cfg's header


def trial_config(base: Config, chosen: dict, number: int, options: Options) -> Config:
    """A trial's run: the base flags, the drawn ones, its own model_dir and run_name, and (unless
    given) no export and checkpoints only at epoch ends, one kept: a search trains many models."""
    from kft.training import trainer
    import kft.tasks  # noqa: F401  (registers the tasks with the trainer)

    changes = dict(chosen, model_dir=trial_dir(options.tune_dir, number),
                   run_name=f"{trainer.default_run_name(base)}_trial{number}")
    for name, value in (("export", False), ("checkpoint_every_steps", 0), ("keep_checkpoints", 1)):
        if name not in options.given:
            changes[name] = value
    return dataclasses.replace(base, **changes)


def trial_dir(tune_dir: str, number: int) -> str:
    return os.path.join(tune_dir, "trials", str(number))


def make_objective(base: Config, space: list[Param], options: Options):
    import keras
    import optuna

    from kft.training import loop
    from kft.training import trainer
    import kft.tasks  # noqa: F401  (registers the tasks with the trainer)

    def run_trial(trial) -> float:
        config = trial_config(base, suggest(trial, space, base), trial.number, options)
        if os.path.exists(config.model_dir):  # left by a deleted study: never resume another run's weights
            logging.warning("removing %s: left by an earlier study", config.model_dir)
            shutil.rmtree(config.model_dir)
        logging.info("trial %d: %s", trial.number, _format_params(trial.params) or "the base flags")
        keras.backend.clear_session()
        metrics = trainer.fit_model(config, config.model_dir, epoch_hook(trial, config.epochs, options.metric)).metrics
        return metric_value(metrics["eval"], options.metric)

    def objective(trial) -> float:
        try:
            return run_trial(trial)
        except loop.Diverged as e:
            trial.set_user_attr("note", f"diverged: {str(e).split(';')[0]}")
            raise optuna.TrialPruned(str(e)) from None
        except FlagError as e:  # a drawn combination the run refuses
            raise FlagError(f"trial {trial.number} ({_format_params(trial.params)}): {e}") from None
        except (loop.Preempted, KeyboardInterrupt) as e:  # a rerun tries this trial's flags again
            trial.set_user_attr("interrupted", str(e) or "Ctrl-C")
            raise
        finally:
            keras.backend.clear_session()
            gc.collect()

    return objective


# -- the study ------------------------------------------------------------------------------------


def _setup_record(base: Config, space: list[Param], metric: str) -> dict:
    """What must stay the same for a rerun to continue a study (flags that do not change a run's
    result, such as --export, may differ)."""
    from kft.training import loop

    flags_now = {k: v for k, v in config_lib.to_dict(base).items() if k not in loop.RESUMABLE_CHANGES}
    return json.loads(json.dumps({"flags": flags_now, "search": [p.spec for p in space], "metric": metric}))


def open_study(base: Config, space: list[Param], options: Options):
    import optuna

    pruner = (optuna.pruners.MedianPruner(n_startup_trials=options.prune_startup_trials, n_warmup_steps=0)
              if options.prune_trials else optuna.pruners.NopPruner())
    path = os.path.abspath(os.path.join(options.tune_dir, "study.db"))
    study = optuna.create_study(study_name="kft", storage=f"sqlite:///{path}", direction="maximize",
                                sampler=optuna.samplers.TPESampler(seed=base.seed), pruner=pruner,
                                load_if_exists=True)
    setup = _setup_record(base, space, options.metric)
    recorded = study.user_attrs.get("setup")
    if recorded is not None:
        # a flag added to kft since the study began counts as having had its default then
        then = {**_setup_record(Config(), space, options.metric)["flags"], **recorded["flags"]}
        now = setup["flags"]
        changed = [f"--{k}: {then.get(k)!r} then, {now.get(k)!r} now"
                   for k in sorted(set(then) | set(now)) if then.get(k) != now.get(k)]
        changed += [f"--{flag}: {recorded[k]} then, {setup[k]} now"
                    for k, flag in (("search", "search"), ("metric", "tune_metric")) if recorded[k] != setup[k]]
        if changed:
            raise FlagError(f"{path} holds a search with other flags ({'; '.join(changed)}). Use the same "
                            "flags to continue it, or another --tune_dir to start a new search.")
    study.set_user_attr("setup", setup)
    return study


def redo_interrupted(study) -> list[int]:
    """Trials an interrupted search left behind (RUNNING when the process was killed, or failed by a
    SIGTERM or Ctrl-C): marked failed, and their flags enqueued to be tried again. Returns their numbers."""
    from optuna.trial import TrialState

    trials = study.get_trials(deepcopy=False)
    already = {t.user_attrs.get("redo_of") for t in trials}
    redo = []
    for t in trials:
        if t.state == TrialState.RUNNING:  # one process searches a tune_dir (the lock): this one died
            study.tell(t.number, state=TrialState.FAIL)
        elif not (t.state == TrialState.FAIL and "interrupted" in t.user_attrs):
            continue
        if t.number not in already:
            study.enqueue_trial(t.params, user_attrs={"redo_of": t.number})
            redo.append(t.number)
    return redo


def _lock(tune_dir: str):
    """An exclusive lock on <tune_dir>/tune.lock for this process's life (released even by SIGKILL):
    a trial left RUNNING in the study can then only be a dead process's."""
    import fcntl

    handle = open(os.path.join(tune_dir, "tune.lock"), "w")
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        handle.close()
        raise FlagError(f"another kft.tune process is searching {tune_dir}; wait for it, or use another "
                        "--tune_dir") from None
    return handle


def search(base: Config, space: list[Param], options: Options) -> dict:
    """Runs the study to --trials finished trials (or --timeout) and returns the report (trials.json)."""
    import optuna
    from optuna.trial import TrialState

    if "://" in options.tune_dir:
        raise FlagError(f"--tune_dir={options.tune_dir}: must be a local folder (the study is a SQLite file)")
    config_lib.check_task_flags(base)
    space = space or default_space(base)
    os.makedirs(options.tune_dir, exist_ok=True)
    lock = _lock(options.tune_dir)
    try:
        optuna.logging.set_verbosity(optuna.logging.ERROR)  # one line per trial is logged below
        study = open_study(base, space, options)
        redone = redo_interrupted(study)
        if redone:
            logging.warning("%d trial(s) cut short by an interrupted run (%s) marked failed; their flags are "
                            "tried again first", len(redone), ", ".join(map(str, redone)))
        finished = len(study.get_trials(deepcopy=False, states=(TrialState.COMPLETE, TrialState.PRUNED)))
        remaining = options.trials - finished
        logging.info("search %s: %d of %d trials finished, %d to run; maximizing eval %s; searching %s",
                     os.path.join(options.tune_dir, "study.db"), finished, options.trials, max(0, remaining),
                     options.metric, ", ".join(p.spec for p in space))

        def after_trial(study, trial):
            _log_trial(study, trial, options.metric)
            write_outputs(study, base, space, options)

        if remaining > 0:
            study.optimize(make_objective(base, space, options), n_trials=remaining,
                           timeout=options.timeout or None, callbacks=[after_trial])
        return write_outputs(study, base, space, options)
    finally:
        lock.close()


def _log_trial(study, trial, metric: str) -> None:
    from optuna.trial import TrialState

    seconds = trial.duration.total_seconds() if trial.duration else 0.0
    params = _format_params(trial.params)
    if trial.state == TrialState.COMPLETE:
        best = study.best_trial
        logging.info("trial %d done in %.1fs: %s %.4f (%s); best so far: trial %d, %.4f", trial.number, seconds,
                     metric, trial.value, params, best.number, best.value)
    else:
        logging.info("trial %d %s in %.1fs (%s): %s", trial.number, trial.state.name.lower(), seconds, params,
                     trial.user_attrs.get("note", ""))


# -- outputs --------------------------------------------------------------------------------------


def _format_params(params: dict) -> str:
    return ", ".join(f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}" for k, v in params.items())


def _rows(study) -> list[dict]:
    from optuna.trial import TrialState

    trials = study.get_trials(deepcopy=False)
    redone_as = {t.user_attrs["redo_of"]: t.number for t in trials if "redo_of" in t.user_attrs}
    rows = []
    for t in trials:
        note = t.user_attrs.get("note", "")
        if t.state == TrialState.FAIL and t.number in redone_as:
            note = f"interrupted; redone as trial {redone_as[t.number]}"
        elif "redo_of" in t.user_attrs:
            note = (note + "; " if note else "") + f"redo of trial {t.user_attrs['redo_of']}"
        timed = t.state in (TrialState.COMPLETE, TrialState.PRUNED) and t.duration
        rows.append({"number": t.number, "state": t.state.name, "params": dict(t.params),
                     "score": t.value if t.state == TrialState.COMPLETE else None,
                     "seconds": round(t.duration.total_seconds(), 1) if timed else None,
                     "epoch_scores": {str(k): v for k, v in sorted(t.intermediate_values.items())},
                     "note": note})
    return rows


def table(report: dict) -> str:
    """The trials as a fixed-width text table."""
    header = ("trial", "state", report["metric"], "seconds", "params", "note")
    lines = [header]
    for r in report["trials"]:
        lines.append((str(r["number"]), r["state"].lower(), "" if r["score"] is None else f"{r['score']:.4f}",
                      "" if r["seconds"] is None else f"{r['seconds']:.1f}", _format_params(r["params"]),
                      r["note"]))
    widths = [max(len(line[i]) for line in lines) for i in range(len(header) - 1)]
    return "\n".join("  ".join(cell.ljust(w) for cell, w in zip(line, widths)) + "  " + line[-1]
                     for line in lines).rstrip()


def flag_line(name: str, value) -> str:
    """One flagfile line that kft.train parses back to `value`."""
    if isinstance(value, bool):
        return f"--{name}" if value else f"--no{name}"
    if isinstance(value, list):
        return f"--{name}={','.join(map(str, value))}"
    return f"--{name}={value!r}" if isinstance(value, float) else f"--{name}={value}"


def best_flagfile(base: Config, best, report: dict, options: Options) -> str:
    """best.cfg: a header, the base flags that differ from the defaults (without the search's
    --model_dir), then the flags the search chose."""
    path = os.path.join(options.tune_dir, "best.cfg")
    finished = sum(r["state"] in ("COMPLETE", "PRUNED") for r in report["trials"])
    lines = [f"# kft.tune: the best of {finished} finished trials in {options.tune_dir}: trial {best.number}, "
             f"eval {options.metric} {best.value:.4f}.",
             f"# Command: python -m kft.train --flagfile={path}",
             f"#          (trial {best.number}'s trained weights, exported without training again: add "
             f"--model_dir={trial_dir(options.tune_dir, best.number)})",
             f"# Search:  {options.command}",
             f"# Searched: {', '.join(report['search'])}"]
    chosen = dict(best.params)
    for f in config_lib.fields():
        value = getattr(base, f.name)
        if f.name not in chosen and f.name != "model_dir" and value != config_lib.default(f):
            lines.append(flag_line(f.name, value))
    lines.append(f"# chosen by the search (trial {best.number})")
    lines += [flag_line(name, value) for name, value in chosen.items()]
    return "\n".join(lines) + "\n"


def write_outputs(study, base: Config, space: list[Param], options: Options) -> dict:
    """trials.json, best.cfg (once a trial completed) and search.png; drops the checkpoints of every
    finished trial but the best (a search trains many models; best.cfg retrains or exports the best)."""
    from optuna.trial import TrialState

    complete = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
    best = max(complete, key=lambda t: t.value) if complete else None
    report = {"metric": options.metric, "direction": "maximize", "search": [p.spec for p in space],
              "best_trial": best.number if best else None, "trials": _rows(study)}
    _write(os.path.join(options.tune_dir, "trials.json"), json.dumps(report, indent=2))
    if best is not None:
        _write(os.path.join(options.tune_dir, "best.cfg"), best_flagfile(base, best, report, options))
    plot(study, report, os.path.join(options.tune_dir, "search.png"))
    for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE, TrialState.PRUNED, TrialState.FAIL)):
        if best is None or t.number != best.number:
            for folder in ("checkpoints", "best"):
                shutil.rmtree(os.path.join(trial_dir(options.tune_dir, t.number), folder), ignore_errors=True)
    return report


def _write(path: str, text: str) -> None:
    with open(path + ".tmp", "w") as f:  # renamed when complete: never half-written
        f.write(text)
    os.replace(path + ".tmp", path)


def importances(study) -> tuple[dict, str]:
    """Parameter importances (PED-ANOVA: needs no scikit-learn, unlike Optuna's fANOVA), or why
    there are none yet."""
    import optuna
    from optuna.trial import TrialState

    complete = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
    names = sorted({name for t in complete for name in t.params})
    if len(complete) < 2:
        return {}, f"parameter importance needs 2 completed trials\n({len(complete)} so far)"
    if len(names) < 2:
        return {}, f"one parameter searched ({names[0] if names else 'none'}):\nno importance to compare"
    with warnings.catch_warnings():  # "too few trials" warnings: the bars are labelled with the count
        warnings.simplefilter("ignore")
        try:
            return optuna.importance.get_param_importances(
                study, evaluator=optuna.importance.PedAnovaImportanceEvaluator()), ""
        except (ValueError, RuntimeError) as e:
            return {}, f"no parameter importance:\n{e}"


def plot(study, report: dict, path: str) -> None:
    """search.png: score by trial with the best so far, and each parameter's importance."""
    import matplotlib

    matplotlib.use("Agg")  # files only; never needs a display
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    rows = report["trials"]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4))
    done = [r for r in rows if r["score"] is not None]
    pruned = [r for r in rows if r["state"] == "PRUNED" and r["epoch_scores"]]
    ax1.plot([r["number"] for r in done], [r["score"] for r in done], "o", label="completed")
    if pruned:
        ax1.plot([r["number"] for r in pruned], [list(r["epoch_scores"].values())[-1] for r in pruned], "x",
                 color="gray", label="pruned (last epoch-end score)")
    if done:
        best, xs, ys = -math.inf, [], []
        for r in done:
            best = max(best, r["score"])
            xs.append(r["number"])
            ys.append(best)
        xs.append(max(r["number"] for r in rows))  # held to the last trial
        ys.append(best)
        ax1.step(xs, ys, where="post", color="C1", label="best so far")
        ax1.legend()
    else:
        ax1.text(0.5, 0.5, "no completed trial yet", ha="center", va="center", transform=ax1.transAxes)
    ax1.xaxis.set_major_locator(matplotlib.ticker.MaxNLocator(integer=True))
    ax1.set_xlabel("trial")
    ax1.set_ylabel(f"eval {report['metric']}")
    ax1.set_title(f"{len(done)} completed, {len(pruned)} pruned")
    values, reason = importances(study)
    if values:
        names = list(values)[::-1]
        ax2.barh(names, [values[n] for n in names])
        ax2.set_xlabel("importance (PED-ANOVA, sums to 1)")
        ax2.set_title(f"parameter importance ({len(done)} completed trials)")
    else:
        ax2.text(0.5, 0.5, reason, ha="center", va="center", transform=ax2.transAxes)
        ax2.set_axis_off()
    fig.tight_layout()
    fig.savefig(path + ".tmp.png", dpi=100)
    plt.close(fig)
    os.replace(path + ".tmp.png", path)


# -- entry point ----------------------------------------------------------------------------------


def _fail(message, status: int = EXIT_BAD_INPUT, prefix: str = "error") -> int:
    print(f"{prefix}: {message}", file=sys.stderr)
    return status


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments {argv[1:]}; every option is a --flag")
    try:
        import optuna  # noqa: F401
    except ImportError:
        return _fail("kft.tune needs Optuna, which is not installed: pip install kft[tune]")
    base = config_lib.from_flags(FLAGS)
    metric = FLAGS.tune_metric or DEFAULT_METRICS.get(base.task, "accuracy")
    try:
        if FLAGS.trials < 1:
            raise FlagError(f"--trials={FLAGS.trials}: must be at least 1")
        if FLAGS.timeout < 0:
            raise FlagError(f"--timeout={FLAGS.timeout}: must be 0 (no limit) or more seconds")
        if FLAGS.prune_startup_trials < 0:
            raise FlagError(f"--prune_startup_trials={FLAGS.prune_startup_trials}: must be 0 or more")
        space = parse_space(FLAGS.search, base)
    except FlagError as e:
        return _fail(e)
    options = Options(FLAGS.tune_dir, FLAGS.trials, FLAGS.timeout, metric, FLAGS.prune_trials,
                      FLAGS.prune_startup_trials,
                      frozenset(f.name for f in config_lib.fields() if FLAGS[f.name].present),
                      " ".join(["python -m kft.tune", *sys.argv[1:]]))
    startup.import_tensorflow()
    from kft.models import backbones
    from kft.training import checkpoints
    from kft.data import sources as data
    from kft.training import loop

    try:
        report = search(base, space, options)
    except (data.DataError, backbones.BackboneError, FlagError, checkpoints.CheckpointError) as e:
        return _fail(e)
    except loop.Preempted as e:  # its message's first clause: how and where the trial stopped
        return _fail(f"{str(e).split(';')[0]}, in a trial; rerun the same command to continue the search (that "
                     "trial is tried again)", EXIT_PREEMPTED, "interrupted" if "Ctrl-C" in str(e) else "preempted")
    except KeyboardInterrupt:
        return _fail("stopped at once; rerun the same command to continue the search (the trial cut short "
                     "is tried again)", EXIT_INTERRUPTED, "interrupted")
    print(table(report))
    if report["best_trial"] is None:
        print(f"\nno trial completed; wrote {os.path.join(options.tune_dir, 'trials.json')} and search.png")
    else:
        print(f"\nbest: trial {report['best_trial']}; wrote {os.path.join(options.tune_dir, 'best.cfg')}, "
              "trials.json and search.png")
    return 0


def run():
    define_flags()  # here, not at import: tests import this module beside kft.train
    config_lib.declare_key_flags()
    caller = sys.argv[0] if __name__ == "__main__" else __name__
    for name in TUNE_FLAGS:  # --help lists the search's flags too, not only --helpfull
        FLAGS.register_key_flag_for_module(caller, FLAGS[name])
    app.run(main)


if __name__ == "__main__":
    run()
