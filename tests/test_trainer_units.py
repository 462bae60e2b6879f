"""The trainer's pieces on their own: flag validation before anything is loaded, the pure metrics.json
builder (throughput after a resume), and which flags a finished run may change when it is rerun."""

from __future__ import annotations

import dataclasses
import json
import os

import pytest

from conftest import tiny_config
from kft.config import Config, FlagError


# -- run_metrics: metrics.json from plain values ------------------------------------------------------

def _training(step: int, epochs: int, resumed_at_step: int, train_seconds: float, examples_per_step: float = 8):
    from kft.training import run_metrics

    state = {"step": step, "stopped_early": False,
             "history": [{"epoch": e + 1, "step": (e + 1) * step // epochs} for e in range(epochs)]}
    return run_metrics.training(
        state, resumed_at_step=resumed_at_step, steps_per_epoch=step // epochs, examples_per_step=examples_per_step,
        global_batch_size=8, replicas=1, workers=1, train_function_traces=1, static_shapes=False,
        jit_compile=False, train_seconds=train_seconds, tokenize_seconds=0.5,
        seconds_split={"steps": train_seconds, "eval": 0.0, "checkpoints": 0.0}, first_call_seconds=0.25,
        eval_seconds=0.1, class_weights=None, learning_rate=1e-3, learning_rate_source="--learning_rate")


def test_a_fresh_run_divides_all_its_examples_by_its_training_seconds():
    training = _training(step=30, epochs=3, resumed_at_step=0, train_seconds=2.0)
    assert training["examples_per_second"] == 30 * 8 / 2.0
    assert training["steps_this_process"] == 30 and training["epochs_run"] == 3


def test_a_resumed_run_divides_only_the_examples_this_process_trained_by_its_seconds():
    # 20 of 30 steps were trained by an earlier, preempted process; this one trained 10 in 2 s.
    training = _training(step=30, epochs=3, resumed_at_step=20, train_seconds=2.0)
    assert training["examples_per_second"] == 10 * 8 / 2.0
    assert training["steps_this_process"] == 10 and training["steps"] == 30


def test_rerunning_a_finished_run_trains_nothing_and_reports_no_throughput():
    training = _training(step=30, epochs=3, resumed_at_step=30, train_seconds=0.001)
    assert training["examples_per_second"] == 0.0 and training["steps_this_process"] == 0


def test_packed_rows_count_the_examples_a_step_holds():
    training = _training(step=10, epochs=1, resumed_at_step=0, train_seconds=4.0, examples_per_step=2.5)
    assert training["examples_per_second"] == 10 * 2.5 / 4.0


def test_the_metrics_dict_puts_each_split_report_at_the_top_and_derives_the_trainable_share():
    from kft.training import run_metrics

    training = _training(step=4, epochs=1, resumed_at_step=0, train_seconds=1.0)
    metrics = run_metrics.metrics(
        run_name="r", task="classification", backbone={"spec": "b"}, method={"method": "lora"},
        adapter_loaded=None, student=None, distillation=None, pruning=None, drift=None, total_parameters=400,
        trainable_parameters=3, sequence_length=64, description="d", labels=["a", "b"],
        data_stats={"train": {"examples": 10}}, training=training,
        results={"eval": {"accuracy": 0.5}, "test": {"accuracy": 0.25}}, config={"seed": 3})
    assert metrics["eval"] == {"accuracy": 0.5} and metrics["test"] == {"accuracy": 0.25}
    assert metrics["parameters"] == {"total": 400, "trainable": 3, "trainable_percent": 0.75}
    assert metrics["data"] == {"description": "d", "labels": ["a", "b"], "train": {"examples": 10}}
    assert json.loads(json.dumps(metrics)) == metrics  # plain values only: metrics.json as returned

    headline = run_metrics.headline({"eval": {"accuracy": 0.5, "loss": 1.0}}, ("accuracy", "macro_f1"))
    metadata = run_metrics.export_metadata(metrics, "d", {"seed": 3}, metrics=headline)
    assert metadata["metrics"] == {"eval": {"accuracy": 0.5}} and metadata["run_name"] == "r"
    assert set(metadata) == {"run_name", "task", "backbone", "method", "parameters", "data", "flags", "metrics"}


# -- validation: refused before any data, backbone or model_dir ---------------------------------------

@pytest.mark.parametrize("overrides, message", [
    (dict(l2sp_weight=0.5), "--l2sp_weight applies with --regularize_to_pretrained=l2sp only"),
    (dict(prune_end_fraction=0.3), "--prune_end_fraction applies with --prune_sparsity only"),
    (dict(prune_sparsity=0.5, method="lora"), "needs --method=full"),
    (dict(prune_sparsity=1.0), r"--prune_sparsity=1.0: must be in \[0, 1\)"),
])
def test_flags_that_cannot_work_are_refused_before_the_backbone_is_loaded(overrides, message, tmp_path):
    from kft.training import trainer

    model_dir = tmp_path / "m"
    # the backbone does not exist: reaching it would fail with another error
    with pytest.raises(FlagError, match=message):
        trainer.fit_model(tiny_config(backbone=str(tmp_path / "no_backbone"), **overrides), str(model_dir))
    assert not model_dir.exists()


def _fake_teacher(folder, **flags) -> str:
    os.makedirs(folder)
    with open(os.path.join(folder, "metrics.json"), "w") as f:
        json.dump({"config": {**dataclasses.asdict(tiny_config()), **flags}}, f)
    return str(folder)


@pytest.mark.parametrize("teacher_flags, student_flags, message", [
    (dict(backbone="teacher_backbone"), dict(backbone="another_backbone"), "contradicts it"),
    (dict(backbone="teacher_backbone", method="prompt"), dict(), "whose blocks cannot be copied"),
])
def test_a_student_that_cannot_copy_its_teacher_is_refused_from_the_teachers_flags_alone(
        teacher_flags, student_flags, message, tmp_path):
    from kft.training import trainer

    # the teacher's backbone does not exist: loading the teacher would fail with another error
    teacher = _fake_teacher(tmp_path / "teacher", **teacher_flags)
    config = tiny_config(teacher=teacher, student_layers=1, **student_flags)
    with pytest.raises(FlagError, match=message):
        trainer.fit_model(config, str(tmp_path / "m"))


# -- resuming: which flags a finished run may change -----------------------------------------------------

EXPORT_CHANGES = dict(export_sampler="top_k", export_top_k=5, export_top_p=0.5, export_temperature=0.7,
                      export_max_new_tokens=7, export_num_beams=2, export_length_penalty=0.5, export=True,
                      export_dir="elsewhere", run_name="again")


def test_export_only_flags_may_change_when_a_run_is_resumed():
    from kft.training import train_state

    saved = dataclasses.asdict(Config(task="causal_lm", max_new_tokens=4))
    for name, value in EXPORT_CHANGES.items():
        train_state.check_same_run(saved, Config(task="causal_lm", max_new_tokens=4, **{name: value}), "ckpt")
    train_state.check_same_run(saved, Config(task="causal_lm", max_new_tokens=4, **EXPORT_CHANGES), "ckpt")


@pytest.mark.parametrize("name, value", [("learning_rate", 0.5), ("epochs", 5), ("max_new_tokens", 8),
                                         ("lora_rank", 2)])
def test_flags_that_change_training_or_its_evaluation_still_refuse_a_resume(name, value):
    from kft.training import train_state

    base = dict(task="causal_lm", max_new_tokens=4)
    with pytest.raises(FlagError, match=f"--{name}: .* then, {value!r} now"):
        train_state.check_same_run(dataclasses.asdict(Config(**base)), Config(**{**base, name: value}), "ckpt")


def test_a_finished_decoder_run_reruns_with_another_sampler_without_training_again(llama_folder, tmp_path):
    import decoder_fixtures as fx
    from kft.training import trainer

    train = fx.write_jsonl(tmp_path / "train.jsonl", fx.chats(8, 0))
    flags = dict(task="causal_lm", backbone=llama_folder, train_file=train, validation_fraction=0.25, epochs=1,
                 batch_size=4, learning_rate=1e-3, warmup_ratio=0.0, export=False, seed=3, max_new_tokens=0,
                 drift=False, checkpoint_every_steps=0)
    model_dir = str(tmp_path / "m")
    first = trainer.train_and_evaluate(Config(**flags), model_dir)
    assert first["training"]["steps_this_process"] == first["training"]["steps"] > 0
    again = trainer.train_and_evaluate(Config(**flags, export_sampler="top_k", export_temperature=0.7,
                                              export_max_new_tokens=3), model_dir)
    assert again["config"]["export_sampler"] == "top_k"
    assert again["training"]["steps"] == first["training"]["steps"]
    assert again["training"]["steps_this_process"] == 0 and again["training"]["examples_per_second"] == 0.0
    assert again["training"]["history"] == first["training"]["history"]
