"""Compression: quantized exports, distillation, students, pruning."""

import json

import numpy as np
import pytest

from conftest import run_python, tiny_config
from kft.training import trainer

SERVE = r"""
import json, sys
sys.modules["keras_hub"] = None  # serving needs tensorflow + tensorflow_text only
import tensorflow as tf
import tensorflow_text  # noqa: F401
path, texts = sys.argv[1], json.loads(sys.argv[2])
out = tf.saved_model.load(path).signatures["serving_default"](text=tf.constant(texts))
print(json.dumps(out["probabilities"].numpy().tolist()))
"""


@pytest.mark.parametrize("mode", ["int8", "int4"])
@pytest.mark.slow
def test_a_quantized_export_serves_what_the_quantized_model_computes_in_a_fresh_process(
        mode, tiny_preset, tmp_path):
    config = tiny_config(backbone=tiny_preset, method="lora", lora_rank=4, epochs=2, quantize=mode,
                         export=True, export_dir=str(tmp_path / "exports"), run_name="q")
    fitted = trainer.fit_model(config, str(tmp_path / "m"))
    info = fitted.metrics["quantization"]
    assert info["mode"] == mode and info["quantized_layers"].get("EinsumDense", 0) >= 8
    assert info["export"].endswith(f"q_{mode}/1") and fitted.metrics["export"].endswith("q/1")
    assert info["export_variables_bytes"] < 0.6 * info["float32_export_variables_bytes"]
    assert set(info["eval"]) == set(info["float32_eval"]) == {"accuracy", "macro_f1"}
    texts = ["a lovely film with a big heart", "dull and far too long", ""]
    proc = run_python(["-c", SERVE, info["export"], json.dumps(texts)])
    assert proc.returncode == 0, proc.stderr[-3000:]
    served = np.array(json.loads(proc.stdout.strip().splitlines()[-1]))
    from kft.models import backbones
    from kft.data import inputs

    loaded = backbones.load(tiny_preset)
    enc = inputs.encode(loaded.tokenizer, loaded.packing, texts, 64)
    ids = enc.ids.to_tensor(default_value=loaded.packing.pad).numpy()
    mask = (np.arange(ids.shape[1])[None, :] < enc.lengths[:, None]).astype(np.int32)
    in_memory = fitted.model({"token_ids": ids, "padding_mask": mask}, training=False).numpy()
    np.testing.assert_allclose(served, in_memory, atol=1e-5)
    meta = json.loads(open(f"{info['export']}/assets.extra/metadata.json").read())
    assert meta["quantization"] == mode
    for name in ("float32", mode):  # serving timed beside float32's, as metrics.json reports it
        timing = info["serving"][name]
        assert 0 < timing["batch_1_p50_ms"] <= timing["batch_1_p99_ms"] and timing["batch_64_texts_per_second"] > 0


def test_quantize_is_refused_for_the_decoder_task():
    from kft.config import FlagError, check_task_flags

    with pytest.raises(FlagError, match="--quantize=int8 applies to"):
        check_task_flags(tiny_config(task="causal_lm", quantize="int8"))


def test_the_distillation_loss_matches_a_hand_computation():
    from kft.compression import distillation

    teacher_p = np.array([[0.7, 0.2, 0.1], [0.1, 0.1, 0.8]])
    student_p = np.array([[0.5, 0.3, 0.2], [0.3, 0.3, 0.4]], np.float32)
    labels = np.array([0, 2])
    temperature, alpha = 3.0, 0.25

    def soften(p):
        z = np.log(p) / temperature
        return np.exp(z) / np.exp(z).sum(-1, keepdims=True)

    t, s = soften(teacher_p), soften(student_p)
    kl = (t * (np.log(t) - np.log(s))).sum(-1) * temperature ** 2
    ce = -np.log(student_p[np.arange(2), labels])
    expected = alpha * kl + (1 - alpha) * ce

    from kft.tasks import classification

    loss = distillation.loss_function(classification.per_example_loss, alpha, temperature, per_position=False)
    got = loss((labels, np.log(teacher_p).astype(np.float32)), student_p)
    np.testing.assert_allclose(np.asarray(got), expected, rtol=1e-5)
    # a student that matches the teacher has no soft loss
    same = distillation.soft_cross_entropy(np.log(teacher_p).astype(np.float32), teacher_p.astype(np.float32), 2.0)
    np.testing.assert_allclose(np.asarray(same), 0.0, atol=1e-6)


def test_students_keep_evenly_spaced_layers_first_and_last_included():
    from kft.compression import students

    assert students.chosen_layers(6, 3) == [0, 3, 5]
    assert students.chosen_layers(12, 6) == [0, 2, 4, 7, 9, 11]
    assert students.chosen_layers(6, 6) == list(range(6))
    assert students.chosen_layers(6, 1) == [5]
    from kft.config import FlagError

    with pytest.raises(FlagError, match="--student_layers=7: the source backbone has 6"):
        students.chosen_layers(6, 7)


@pytest.fixture(scope="module")
def teacher_run(tiny_preset, tmp_path_factory):
    path = str(tmp_path_factory.mktemp("teacher"))
    trainer.fit_model(tiny_config(backbone=tiny_preset, epochs=2), path)
    return path


def test_a_student_copies_the_teachers_chosen_layers_and_head_and_the_teacher_runs_once(
        teacher_run, tiny_preset, tmp_path, monkeypatch):
    from kft.models import backbones
    from kft.compression import distillation

    calls = []
    original = distillation.predict_log_probabilities
    monkeypatch.setattr(distillation, "predict_log_probabilities",
                        lambda *a, **k: original(*a, **{**k, "counter": calls}))
    # copy the student's weights before training changes them: no training steps (epochs=0)
    config = tiny_config(backbone=tiny_preset, teacher=teacher_run, student_layers=1, epochs=0)
    fitted = trainer.fit_model(config, str(tmp_path / "student0"))
    teacher = distillation.load_teacher(teacher_run, config)
    assert fitted.metrics["student"]["copied_layers"] == [1]
    student_blocks = backbones.transformer_layers(fitted.model.get_layer(index=2))
    assert len(student_blocks) == 1
    for a, b in zip(student_blocks[0].get_weights(), backbones.transformer_layers(teacher.loaded.backbone)[1].get_weights()):
        np.testing.assert_array_equal(a, b)
    np.testing.assert_array_equal(fitted.model.get_layer("classifier").get_weights()[0],
                                  teacher.model.get_layer("classifier").get_weights()[0])

    calls.clear()
    config = tiny_config(backbone=tiny_preset, teacher=teacher_run, student_layers=1, epochs=3)
    model_dir = str(tmp_path / "student")
    fitted = trainer.fit_model(config, model_dir)
    n = len(fitted.train_lengths)
    batches = -(-n // (4 * config.batch_size))
    assert len(calls) == batches  # one forward pass per training example in all, not per step
    assert fitted.metrics["training"]["steps"] > batches
    assert fitted.metrics["distillation"]["alpha"] == 0.5
    calls.clear()
    trainer.fit_model(config, model_dir)  # a rerun of the finished run reads the cached outputs
    assert calls == []


def test_distillation_flags_that_cannot_work_are_refused(teacher_run, tiny_preset, tmp_path):
    from kft.config import FlagError

    cases = [
        (dict(teacher=teacher_run, task="token_classification", train_file="x"), "was trained for --task=classification"),
        (dict(teacher=teacher_run, student_layers=3), "--student_layers=3: the source backbone has 2"),
        (dict(teacher=teacher_run, distill_alpha=1.5), "--distill_alpha=1.5: must be in"),
        (dict(distill_temperature=4.0), "--distill_temperature applies with --teacher only"),
        (dict(teacher=str(tmp_path)), "no metrics.json"),
    ]
    for overrides, message in cases:  # --epochs=0: refused before any training, so none is needed
        with pytest.raises(FlagError, match=message):
            trainer.fit_model(tiny_config(backbone=tiny_preset, epochs=0, **overrides), str(tmp_path / "x"))
    from kft.compression import distillation

    teacher = distillation.load_teacher(teacher_run, tiny_config(backbone=tiny_preset))
    with pytest.raises(FlagError, match=r"predicts labels \['negative', 'positive'\]; this run's data has"):
        distillation.check_labels(teacher, ["positive", "negative"])


def test_gradual_pruning_schedule_rises_cubically_and_holds():
    from kft.compression import pruning

    values = [pruning.target_sparsity(t, 0.5, 100) for t in (0, 25, 50, 100, 150)]
    assert values[0] == 0.0 and values[-2] == values[-1] == 0.5
    assert values[1] == pytest.approx(0.5 * (1 - 0.75 ** 3)) and values[1] < values[2] < 0.5


def test_pruned_weights_stay_zero_through_later_optimizer_steps_and_sparsity_is_measured(tiny_preset, tmp_path):
    config = tiny_config(backbone=tiny_preset, epochs=4, prune_sparsity=0.5, prune_end_fraction=0.5)
    fitted = trainer.fit_model(config, str(tmp_path / "m"))
    report = fitted.metrics["pruning"]
    steps = fitted.metrics["training"]["steps"]
    assert report["end_step"] == round(0.5 * steps) < steps  # half the steps ran after the last update
    assert len(report["per_layer"]) == 2 * 6  # q, k, v, output, ffn in/out of 2 blocks
    for path, share in report["per_layer"].items():
        assert share == pytest.approx(0.5, abs=0.002), path  # Adam moved none of the zeros
    assert report["measured"] == pytest.approx(0.5, abs=0.001)
    backbone_kernels = [w for w in fitted.model.weights if "transformer_layer" in w.path and w.path.endswith("kernel")]
    zeros = sum(int(np.sum(np.asarray(w.numpy()) == 0)) for w in backbone_kernels)
    assert zeros == pytest.approx(0.5 * sum(int(np.prod(w.shape)) for w in backbone_kernels), rel=0.01)


def test_pruning_flags_are_checked(tiny_preset, tmp_path):
    from kft.config import FlagError

    for overrides, message in [(dict(prune_sparsity=1.0), r"--prune_sparsity=1.0: must be in \[0, 1\)"),
                               (dict(prune_sparsity=0.5, method="lora"), "needs --method=full"),
                               (dict(prune_end_fraction=0.3), "applies with --prune_sparsity only")]:
        with pytest.raises(FlagError, match=message):
            trainer.fit_model(tiny_config(backbone=tiny_preset, epochs=0, **overrides), str(tmp_path / "x"))
