"""kft.tune: the search space, pruning, a tiny search's outputs, and a killed search resumed."""

import json
import os
import re
import signal
import subprocess
import sys
import threading
import time

import optuna
import pytest
from absl import flags

from conftest import ROOT, run_python, tiny_config
from kft import config as config_lib
from kft import tune
from kft.config import FlagError

# A few steps per trial: 48 training rows, batches of 16, 24 eval rows.
TINY = ["--dataset=sample_reviews", "--max_train_examples=48", "--max_eval_examples=24", "--batch_size=16",
        "--num_buckets=1", "--nodrift", "--warmup_ratio=0", "--log_every_steps=1"]


def _options(tune_dir, trials=3, **overrides):
    values = dict(tune_dir=str(tune_dir), trials=trials, timeout=0, metric="accuracy", prune_trials=True,
                  prune_startup_trials=1, given=frozenset(), command="python -m kft.tune (test)")
    values.update(overrides)
    return tune.Options(**values)


def test_search_values_become_params_of_the_fields_types():
    base = config_lib.Config()
    space = tune.parse_space(["batch_size:choice:8,16,32", "learning_rate:loguniform:1e-5:1e-3",
                              "epochs:int:1:3", "dropout:uniform:0:0.3", "method:choice:full,lora",
                              "lora_rank:choice:4,8,16", "cache_tokens:choice:true,false"], base)
    by_name = {p.name: p for p in space}
    assert space[0].name == "method"  # drawn first: it decides which others are drawn
    assert by_name["batch_size"].choices == (8, 16, 32)
    assert by_name["method"].choices == ("full", "lora")
    assert by_name["cache_tokens"].choices == (True, False)
    assert (by_name["learning_rate"].kind, by_name["learning_rate"].low, by_name["learning_rate"].high) == \
        ("loguniform", 1e-5, 1e-3)
    assert (by_name["epochs"].low, by_name["epochs"].high) == (1, 3) and isinstance(by_name["epochs"].low, int)
    assert isinstance(by_name["dropout"].low, float)


@pytest.mark.parametrize("spec, says", [
    ("learnig_rate:loguniform:1e-5:1e-3", "'learnig_rate' is not a kft flag (did you mean learning_rate?)"),
    ("dropout:normal:0:0.3", "unknown distribution 'normal'"),
    ("learning_rate:loguniform:0:1e-3", "loguniform needs LOW > 0"),
    ("epochs:int:3:1", "LOW must be below HIGH"),
    ("epochs:int:1:three", "'three' is not a int"),
    ("epochs:uniform:1:3", "--epochs is an integer; use int"),
    ("method:choice:full,adam", "--method takes full, freeze, lora, prompt, prefix, bitfit, not adam"),
    ("lora_rank:choice:4,8", "--lora_rank applies with --method=lora only"),
    ("crf:choice:true,false", "--crf applies to --task=token_classification, not --task=classification"),
    ("lora_targets:choice:query", "--lora_targets is a list flag"),
    ("model_dir:choice:a,b", "--model_dir cannot be searched"),
    ("learning_rate", "expected name:distribution:arguments"),
])
def test_a_bad_search_value_is_a_flag_error_naming_it(spec, says):
    with pytest.raises(FlagError) as e:
        tune.parse_space([spec], config_lib.Config())
    assert str(e.value).startswith(f"--search={spec}: ") and says in str(e.value), str(e.value)


@pytest.mark.slow
def test_the_cli_refuses_a_bad_search_value_with_status_2_and_one_line(tmp_path):
    proc = run_python(["-m", "kft.tune", "--dataset=sample_reviews", "--search=learnig_rate:loguniform:1e-5:1e-3",
                       f"--tune_dir={tmp_path}"])
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert proc.stderr.strip() == ("error: --search=learnig_rate:loguniform:1e-5:1e-3: 'learnig_rate' is not a "
                                   "kft flag (did you mean learning_rate?)")


@pytest.mark.slow
def test_without_optuna_the_cli_says_how_to_install_it(tmp_path):
    fake = tmp_path / "optuna"
    fake.mkdir()
    (fake / "__init__.py").write_text("raise ImportError('No module named optuna')\n")
    proc = run_python(["-m", "kft.tune", "--dataset=sample_reviews", f"--tune_dir={tmp_path / 'search'}"],
                      env={"PYTHONPATH": str(tmp_path)})
    assert proc.returncode == 2
    assert proc.stderr.strip() == "error: kft.tune needs Optuna, which is not installed: pip install kft[tune]"


@pytest.mark.slow
def test_helpfull_groups_the_search_flags_under_their_own_heading():
    proc = run_python(["-m", "kft.tune", "--helpfull"])
    text = proc.stdout
    assert "kft: tune:" in text
    section = text.split("kft: tune:")[1]
    for name in tune.TUNE_FLAGS:
        assert f"--{name}" in section, name
    assert "kft: optimisation:" in text and "--learning_rate" in text


def test_method_specific_flags_are_drawn_only_for_their_method():
    base = config_lib.Config()
    space = tune.parse_space(["method:choice:full,lora,prompt", "lora_rank:choice:4,8",
                              "num_prompt_tokens:int:5:20", "dropout:uniform:0:0.3"], base)
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0), direction="maximize")
    seen = set()
    for _ in range(20):
        trial = study.ask()
        chosen = tune.suggest(trial, space, base)
        seen.add(chosen["method"])
        assert ("lora_rank" in chosen) == (chosen["method"] == "lora")
        assert ("num_prompt_tokens" in chosen) == (chosen["method"] == "prompt")
        assert "dropout" in chosen
        study.tell(trial, 0.5)
    assert seen == {"full", "lora", "prompt"}


def test_the_default_space_centres_the_learning_rate_on_the_methods_default():
    space = {p.name: p for p in tune.default_space(config_lib.Config(method="lora"))}
    assert (space["learning_rate"].low, space["learning_rate"].high) == pytest.approx((3e-3 / 4, 3e-3 * 4))
    assert (space["epochs"].low, space["epochs"].high) == (1, 3)


def test_a_trial_below_the_median_is_pruned_but_never_at_its_last_epoch():
    study = optuna.create_study(direction="maximize", pruner=optuna.pruners.MedianPruner(n_startup_trials=1))
    good = study.ask()
    hook = tune.epoch_hook(good, epochs=3)
    for epoch in (1, 2, 3):
        hook(epoch, 0.9)
    study.tell(good, 0.9)

    bad = study.ask()
    with pytest.raises(optuna.TrialPruned):
        tune.epoch_hook(bad, epochs=3)(1, 0.2)
    assert bad.user_attrs["note"] == "pruned after epoch 1 (score 0.2000)"
    study.tell(bad, state=optuna.trial.TrialState.PRUNED)

    last = study.ask()
    tune.epoch_hook(last, epochs=1)(1, 0.2)  # its final score is already paid for: kept
    assert last.should_prune()  # the pruner would stop it, as it stopped `bad` at the same score
    assert "note" not in last.user_attrs
    assert last.storage.get_trial(last._trial_id).intermediate_values == {1: 0.2}


def test_the_pruner_is_given_the_searched_metric_from_the_epoch_scores_not_the_runs_own_score():
    study = optuna.create_study(direction="maximize")
    trial = study.ask()
    hook = tune.epoch_hook(trial, epochs=3, metric="entity_f1")
    hook(1, 0.97, {"accuracy": 0.97, "entity_f1": 0.41, "loss": 0.2})
    tune.epoch_hook(trial, epochs=3, metric="-loss")(2, 0.97, {"accuracy": 0.97, "loss": 0.2})
    tune.epoch_hook(trial, epochs=3, metric="f1")(3, 0.55, {"accuracy": 0.5, "score": 0.55})  # no f1: the score
    assert trial.storage.get_trial(trial._trial_id).intermediate_values == {1: 0.41, 2: -0.2, 3: 0.55}


def test_an_epoch_hook_that_raises_ends_the_run_and_leaves_signal_handling_as_it_was(tiny_preset, tmp_path):
    import keras

    from kft.training import trainer

    seen = []

    def hook(epoch, score, scores):
        seen.append((epoch, score))
        raise optuna.TrialPruned("below the median")

    term, interrupt = signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGINT)
    policy = keras.mixed_precision.global_policy().name
    config = tiny_config(backbone=tiny_preset, epochs=2, max_train_examples=48, max_eval_examples=24,
                         num_buckets=1, drift=False)
    with pytest.raises(optuna.TrialPruned):
        trainer.fit_model(config, str(tmp_path / "m"), epoch_hook=hook)
    assert len(seen) == 1 and seen[0][0] == 1 and 0.0 <= seen[0][1] <= 1.0
    assert signal.getsignal(signal.SIGTERM) is term and signal.getsignal(signal.SIGINT) is interrupt
    assert keras.mixed_precision.global_policy().name == policy


def _fresh_train_flags():
    fv = flags.FlagValues()
    config_lib.define_flags(fv)
    return fv


def test_a_search_writes_the_study_the_table_best_cfg_and_a_plot(tiny_preset, tmp_path):
    from kft.training import trainer

    fv = flags.FlagValues()
    tune.define_flags(fv)
    fv(["kft.tune", *TINY, f"--backbone={tiny_preset}", "--epochs=1", "--search=learning_rate:loguniform:1e-4:1e-2",
        "--search=dropout:uniform:0:0.3"])
    base = config_lib.from_flags(fv)
    tune_dir = tmp_path / "search"
    report = tune.search(base, tune.parse_space(fv.search, base), _options(tune_dir, trials=3))

    study = optuna.load_study(study_name="kft", storage=f"sqlite:///{tune_dir / 'study.db'}")
    assert len(study.trials) == 3 and {t.state.name for t in study.trials} <= {"COMPLETE", "PRUNED"}
    assert json.loads((tune_dir / "trials.json").read_text()) == report
    rows = report["trials"]
    assert [r["number"] for r in rows] == [0, 1, 2]
    best = report["best_trial"]
    assert rows[best]["score"] == max(r["score"] for r in rows if r["score"] is not None)
    for r in rows:
        assert set(r["params"]) == {"learning_rate", "dropout"} and r["seconds"] > 0
        metrics = json.loads((tune_dir / "trials" / str(r["number"]) / "metrics.json").read_text()) \
            if r["state"] == "COMPLETE" else None
        if metrics:
            assert r["score"] == metrics["eval"]["accuracy"]
            assert list(r["epoch_scores"].values()) == [e["val_accuracy"] for e in metrics["training"]["history"]]
        # checkpoints are kept for the best trial only
        kept = (tune_dir / "trials" / str(r["number"]) / "checkpoints").exists()
        assert kept == (r["number"] == best)
    text = tune.table(report)
    assert text.splitlines()[0].split() == ["trial", "state", "accuracy", "seconds", "params", "note"]
    assert len(text.splitlines()) == 4
    assert (tune_dir / "search.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    # best.cfg is a kft.train flagfile: the base flags and the chosen ones, no trial model_dir
    cfg = (tune_dir / "best.cfg").read_text()
    assert cfg.startswith(f"# kft.tune: the best of 3 finished trials in {tune_dir}: trial {best}")
    assert not [line for line in cfg.splitlines() if line.startswith(("--model_dir", "--run_name"))]
    fv = _fresh_train_flags()
    fv(["kft.train", f"--flagfile={tune_dir / 'best.cfg'}"])
    chosen = rows[best]["params"]
    assert config_lib.from_flags(fv) == config_lib.Config(**{**config_lib.to_dict(base), **chosen})

    # ... and with the best trial's model_dir it evaluates that trial's weights without training again
    fv = _fresh_train_flags()
    fv(["kft.train", f"--flagfile={tune_dir / 'best.cfg'}", f"--model_dir={tune_dir}/trials/{best}", "--noexport"])
    before = json.loads((tune_dir / "trials" / str(best) / "metrics.json").read_text())
    again = trainer.train_and_evaluate(config_lib.from_flags(fv), f"{tune_dir}/trials/{best}")
    assert again["training"]["steps"] == before["training"]["steps"]
    assert again["training"]["history"] == before["training"]["history"]
    assert again["eval"]["accuracy"] == rows[best]["score"]


def test_a_study_refuses_to_continue_with_other_flags(tmp_path):
    base = tiny_config()
    space = tune.parse_space(["epochs:int:1:2"], base)
    options = _options(tmp_path)
    first = tune.open_study(base, space, options)
    first.tell(first.ask({"epochs": optuna.distributions.IntDistribution(1, 2)}), 0.5)
    # --export does not change a trial's result: the same study continues, with its trial
    again = tune.open_study(config_lib.Config(**{**config_lib.to_dict(base), "export": True}), space, options)
    assert [(t.number, t.value) for t in again.trials] == [(0, 0.5)]
    assert again.user_attrs["setup"] == first.user_attrs["setup"]
    with pytest.raises(FlagError, match=r"--learning_rate: 0\.001 then, 0\.002 now.*another --tune_dir"):
        tune.open_study(config_lib.Config(**{**config_lib.to_dict(base), "learning_rate": 2e-3}), space, options)


def test_one_process_searches_a_tune_dir_at_a_time(tmp_path):
    held = tune._lock(str(tmp_path))
    try:
        with pytest.raises(FlagError, match="another kft.tune process is searching"):
            tune._lock(str(tmp_path))
    finally:
        held.close()
    again = tune._lock(str(tmp_path))  # released with its holder: the next search may take it
    assert not again.closed and os.path.exists(tmp_path / "tune.lock")
    again.close()


@pytest.mark.slow
def test_a_search_killed_mid_trial_resumes_and_redoes_that_trial(tiny_preset, tmp_path):
    space = tmp_path / "space.cfg"
    space.write_text("\n".join([*TINY, f"--backbone={tiny_preset}", "--epochs=1",
                                "--search=learning_rate:loguniform:1e-4:1e-2", ""]))
    tune_dir = tmp_path / "search"
    args = ["-m", "kft.tune", f"--flagfile={space}", "--trials=1", f"--tune_dir={tune_dir}"]
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2"}
    proc = subprocess.Popen([sys.executable, *args], cwd=ROOT, env=env, text=True,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    lines = []
    training = threading.Event()

    def read():
        for line in proc.stderr:
            lines.append(line)
            if re.search(r"step \d+/\d+ \(epoch", line):
                training.set()

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    deadline = time.time() + 300
    while not training.is_set() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.01)
    assert proc.poll() is None, "the search ended before it could be killed:\n" + "".join(lines)[-3000:]
    proc.kill()
    assert proc.wait(timeout=60) == -signal.SIGKILL
    reader.join(timeout=10)
    storage = f"sqlite:///{tune_dir / 'study.db'}"
    killed = optuna.load_study(study_name="kft", storage=storage).trials
    assert [t.state.name for t in killed] == ["RUNNING"]

    rerun = run_python(args)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    assert "1 trial(s) cut short by an interrupted run (0) marked failed" in rerun.stderr
    trials = optuna.load_study(study_name="kft", storage=storage).trials
    assert [t.state.name for t in trials] == ["FAIL", "COMPLETE"]
    assert trials[1].params == killed[0].params and trials[1].user_attrs["redo_of"] == 0
    rows = json.loads((tune_dir / "trials.json").read_text())["trials"]
    assert rows[0]["note"] == "interrupted; redone as trial 1" and rows[1]["note"] == "redo of trial 0"
    assert re.search(r"^0 +fail .*interrupted; redone as trial 1$", rerun.stdout, re.M), rerun.stdout
    assert "best: trial 1; wrote" in rerun.stdout
    assert (tune_dir / "best.cfg").exists() and (tune_dir / "search.png").exists()
