"""The token-classification head: losses over first pieces, CRF word gathering, one training step."""

import json

import numpy as np
import pytest
import tensorflow as tf

from kft.models import backbones
from kft.models import savedmodel as export
from kft.tasks.token_classification import crf as crf_lib
from kft.tasks import token_classification as task

TAGS = ["O", "B-LOC", "I-LOC", "B-PER", "I-PER"]
IDS = np.array([[2, 7, 9, 11, 12, 3], [2, 5, 6, 3, 0, 0]], np.int32)
MASK = (IDS > 0).astype(np.int32)
LABELS = np.array([[-1, 1, -1, 2, 0, -1], [-1, 3, 4, -1, -1, -1]], np.int32)  # first pieces only


@pytest.fixture(params=[False, True], ids=["softmax", "crf"])
def model(request, tiny_preset):
    loaded = backbones.load(tiny_preset)
    return task.build_model(loaded.backbone, len(TAGS), 0.0, use_crf=request.param, tags=TAGS, seed=1)


def test_softmax_loss_sums_the_cross_entropy_of_tagged_positions(tiny_preset):
    probabilities = np.random.default_rng(0).dirichlet(np.ones(5), size=(2, 6)).astype("float32")
    got = np.asarray(task.loss_function(task.build_model(backbones.load(tiny_preset).backbone, 5, 0.0))(
        LABELS, probabilities))
    for b in range(2):
        tagged = np.flatnonzero(LABELS[b] >= 0)
        expected = -np.sum(np.log(probabilities[b, tagged, LABELS[b, tagged]]))
        assert got[b] == pytest.approx(expected, rel=1e-5)


def test_gather_words_moves_tagged_positions_to_the_front():
    values = np.arange(12, dtype="float32").reshape(2, 6)
    moved, word_labels, mask = task.gather_words(tf.constant(values), tf.constant(LABELS))
    moved = np.asarray(moved)
    assert moved[0, :3].tolist() == [1.0, 3.0, 4.0] and moved[1, :2].tolist() == [7, 8]
    assert np.asarray(word_labels).tolist() == [[1, 2, 0, 0, 0, 0], [3, 4, 0, 0, 0, 0]]
    assert np.asarray(mask).sum(1).tolist() == [3, 2]


def test_crf_loss_is_the_word_level_negative_log_likelihood(tiny_preset):
    model = task.build_model(backbones.load(tiny_preset).backbone, 5, 0.0, use_crf=True, tags=TAGS)
    crf = task.crf_layer(model)
    crf.transitions.assign(np.random.default_rng(1).normal(size=(5, 5)).astype("float32"))
    scores = np.random.default_rng(2).normal(size=(2, 6, 5)).astype("float32")
    got = np.asarray(task.loss_function(model)(LABELS, scores))
    for b in range(2):
        tagged = np.flatnonzero(LABELS[b] >= 0)
        words = scores[b, tagged][None]
        nll = crf.negative_log_likelihood(words, LABELS[b, tagged][None], np.ones((1, len(tagged)), "int32"))
        assert got[b] == pytest.approx(float(np.asarray(nll)[0]), rel=1e-5)


def test_one_step_trains_the_head_and_the_transitions(model):
    loss_fn = task.loss_function(model)
    before = {id(v): v.numpy().copy() for v in model.trainable_variables}
    with tf.GradientTape() as tape:
        loss = tf.reduce_mean(loss_fn(LABELS, model({"token_ids": IDS, "padding_mask": MASK}, training=True)))
    grads = tape.gradient(loss, model.trainable_variables)
    assert all(g is not None for g in grads)
    for v, g in zip(model.trainable_variables, grads):
        v.assign_sub(0.1 * tf.convert_to_tensor(g))
    changed = {v.path for v in model.trainable_variables if not np.array_equal(before[id(v)], v.numpy())}
    assert "tagger/kernel" in changed
    if task.crf_layer(model) is not None:
        assert "crf/transitions" in changed


def test_predicted_words_follow_iob2_with_a_crf(model):
    outputs = model({"token_ids": IDS, "padding_mask": MASK}).numpy()
    words = task.predict_words(model, outputs, LABELS)
    assert [len(w) for w in words] == [3, 2]
    if task.crf_layer(model) is not None:
        allowed, start = crf_lib.iob2_constraints(TAGS)
        for w in words:
            assert start[w[0]] and all(allowed[a, b] for a, b in zip(w[:-1], w[1:]))


def _write_conll(path, n, seed):
    """Sentences where 'actor'/'actress' (+ 'act') are people and 'board'/'book' organisations."""
    rng = np.random.default_rng(seed)
    filler = ["a", "about", "across", "all", "also", "and", "another", "as", "at", "bad", "beautiful", "big"]
    lines = ["-DOCSTART- O", ""]
    for _ in range(n):
        for _ in range(int(rng.integers(3, 12))):
            r = rng.random()
            if r < 0.15:
                lines.append(f"{rng.choice(['actor', 'actress'])} B-PER")
                if rng.random() < 0.5:
                    lines.append("act I-PER")
            elif r < 0.25:
                lines.append(f"{rng.choice(['board', 'book'])} B-ORG")
            else:
                lines.append(f"{rng.choice(filler)} O")
        lines.append("")
    path.write_text("\n".join(lines) + "\n")
    return str(path)


@pytest.mark.parametrize("use_crf", [False, True], ids=["softmax", "crf"])
def test_token_classification_trains_end_to_end_and_scores_every_word(tiny_preset, tmp_path, use_crf):
    from conftest import tiny_config
    from kft.training import trainer

    config = tiny_config(dataset="", backbone=tiny_preset, task="token_classification", crf=use_crf,
                         train_file=_write_conll(tmp_path / "train.txt", 200, 0),
                         eval_file=_write_conll(tmp_path / "valid.txt", 40, 1),
                         epochs=3, learning_rate=3e-3, sequence_length=8, stride=2)
    seen = []
    metrics = trainer.fit_model(config, str(tmp_path / "m"),
                                epoch_hook=lambda epoch, score, scores: seen.append((score, scores))).metrics
    data, report = metrics["data"], metrics["eval"]
    # the best epoch (and a search's pruning) goes by entity F1, not by token accuracy
    assert len(seen) == 3 and all(score == scores["score"] == scores["entity_f1"] for score, scores in seen)
    assert data["labels"] == ["O", "B-ORG", "B-PER", "I-PER"]
    assert data["eval"]["split_sentences"] > 0 and data["eval"]["windows"] > data["eval"]["sentences"]
    assert report["words"] == data["eval"]["words"]  # every word of every window-split sentence scored
    assert report["entity_f1"] > 0.8 and set(report["per_type"]) == {"ORG", "PER"}
    assert (tmp_path / "m" / "entity_scores.png").exists()


def test_balanced_tag_weights_scale_the_loss_of_each_tagged_position(tiny_preset, tmp_path):
    from conftest import tiny_config
    from kft.training import trainer
    from kft.config import FlagError

    probabilities = np.random.default_rng(0).dirichlet(np.ones(5), size=(2, 6)).astype("float32")
    weights = {0: 0.5, 1: 2.0, 2: 3.0, 3: 1.0, 4: 4.0}
    model = task.build_model(backbones.load(tiny_preset).backbone, 5, 0.0)
    got = np.asarray(task.loss_function(model, weights)(LABELS, probabilities))
    for b in range(2):
        tagged = np.flatnonzero(LABELS[b] >= 0)
        ce = -np.log(probabilities[b, tagged, LABELS[b, tagged]]) * [weights[t] for t in LABELS[b, tagged]]
        assert got[b] == pytest.approx(ce.sum(), rel=1e-5)
    train = _write_conll(tmp_path / "train.txt", 30, 0)
    metrics = trainer.fit_model(tiny_config(dataset="", backbone=tiny_preset, task="token_classification",
                                            train_file=train, class_weights="balanced"),
                                str(tmp_path / "a")).metrics
    weights = metrics["training"]["class_weights"]
    assert weights[0] < 1.0 < weights[1]  # "O" is the most frequent tag
    with pytest.raises(FlagError, match="with --crf the loss is one sequence likelihood"):
        trainer.fit_model(tiny_config(dataset="", backbone=tiny_preset, task="token_classification",
                                      train_file=train, class_weights="balanced", crf=True, epochs=0),
                          str(tmp_path / "b"))


SERVE = r"""
import json, sys
import numpy as np
import tensorflow as tf
import tensorflow_text  # noqa: F401
path, request, out = sys.argv[1:]
texts = json.load(open(request))
model = tf.saved_model.load(path)
def arrays(result, prefix):
    return {prefix + k: (v.numpy().astype("S") if v.dtype == tf.string else v.numpy())
            for k, v in result.items()}
by_text = arrays(model.signatures["serving_default"](text=tf.constant(texts)), "text_")
width = max(len(t.split()) for t in texts)
words = [t.split() + [""] * (width - len(t.split())) for t in texts]
by_words = arrays(model.signatures["serve_words"](words=tf.constant(words)), "words_")
np.savez(out, **by_text, **by_words)
"""


@pytest.mark.parametrize("use_crf", [False, True], ids=["softmax", "crf"])
@pytest.mark.slow
def test_token_export_round_trips_in_a_fresh_process(tiny_preset, tmp_path, use_crf):
    from conftest import run_python, tiny_config
    from kft.training import trainer
    from kft.tasks.token_classification import inputs as token_inputs
    from kft.reporting.metrics import entity_spans

    config = tiny_config(dataset="", backbone=tiny_preset, task="token_classification", crf=use_crf,
                         train_file=_write_conll(tmp_path / "train.txt", 200, 0),
                         eval_file=_write_conll(tmp_path / "valid.txt", 20, 1), epochs=2, learning_rate=3e-3,
                         export=True, export_dir=str(tmp_path / "x"))
    trained = trainer.fit_model(config, str(tmp_path / "m"))
    names = trained.metrics["data"]["labels"]
    texts = ["the actor act was in a book", "board", "a  big\tactress and another board"]
    # in memory: each text as one window, read at the first pieces
    loaded = backbones.load(tiny_preset)
    split = [t.split() for t in texts]
    pieces, _ = token_inputs.sentence_pieces(loaded.tokenizer, split)
    windows = token_inputs.encode(pieces, None, loaded.packing, 512, 32)
    width = max(windows.lengths)
    ids = np.array([np.pad(w, (0, width - len(w)), constant_values=loaded.packing.pad) for w in windows.ids])
    mask = (np.arange(width)[None] < windows.lengths[:, None]).astype(np.int32)
    marks = np.array([np.pad(m, (0, width - len(m)), constant_values=-1) for m in windows.labels])
    outputs = trained.model({"token_ids": ids, "padding_mask": mask}).numpy()
    expected = [[names[i] for i in row] for row in task.predict_words(trained.model, outputs, marks)]

    (tmp_path / "request.json").write_text(json.dumps(texts))
    proc = run_python(["-c", SERVE, trained.metrics["export"], str(tmp_path / "request.json"),
                       str(tmp_path / "out.npz")])
    assert proc.returncode == 0, proc.stderr[-3000:]
    got = np.load(tmp_path / "out.npz")
    for prefix in ("text_", "words_"):
        tags = [[t.decode() for t in row if t] for row in got[prefix + "tags"]]
        assert tags == expected
        for i, text in enumerate(texts):  # entities: the CoNLL spans of the tags, with their text
            kinds, starts, ends = (got[prefix + k][i] for k in ("entity_type", "entity_start_word",
                                                                  "entity_end_word"))
            count = got[prefix + "entity_count"][i]
            spans = [(kinds[e].decode(), int(starts[e]), int(ends[e])) for e in range(count)]
            assert spans == entity_spans(expected[i])
            source = text if prefix == "text_" else " ".join(split[i])
            for e, (_, a, b) in enumerate(spans):
                chars = source[got[prefix + "entity_start_char"][i, e]:got[prefix + "entity_end_char"][i, e]]
                assert chars.split() == split[i][a:b]
    if not use_crf:  # the softmax head's word scores are its probabilities
        best = [outputs[r][marks[r] >= 0].max(-1) for r in range(len(texts))]
        for r in range(len(texts)):
            np.testing.assert_allclose(got["text_tag_scores"][r, :len(best[r])], best[r], atol=1e-5)
        # kft.predict prints each text's entities (type, text, character span) as a JSON line
        proc = run_python(["-m", "kft.predict", f"--model={trained.metrics['export']}", texts[0]])
        assert proc.returncode == 0, proc.stderr[-3000:]
        line = json.loads(proc.stdout.strip().splitlines()[-1])
        assert [(e["type"], e["text"]) for e in line["entities"]] == [
            (kind, " ".join(split[0][a:b])) for kind, a, b in entity_spans(expected[0])]
        assert [t for _, t in line["tags"]] == expected[0]
        # kft.bench --mode=serve times the token export on the eval sentences, read back in full
        from kft.benchmarks import rows as benchmark

        options = benchmark.Options([], 0, "", trained.metrics["export"], 20, [])
        row = benchmark.serve_row(config, options, 0.0)
        assert row["batch_1"]["requests"] == 20 and row["batch_64"]["texts_per_second"] > 0
        assert row["texts"].startswith("20 texts")


@pytest.mark.parametrize("overrides", [{"method": "lora"}, {"method": "prompt", "num_prompt_tokens": 3},
                                       {"method": "prefix", "prefix_length": 3}, {"method": "bitfit"}],
                         ids=lambda o: o["method"])
def test_tuning_methods_work_with_the_token_head(tiny_preset, overrides):
    from conftest import tiny_config
    from kft import methods

    loaded = backbones.load(tiny_preset)
    backbone, _ = methods.apply(loaded.backbone, tiny_config(**overrides), loaded.tokenizer.get_vocabulary())
    model = task.build_model(backbone, len(TAGS), 0.0, use_crf=True, tags=TAGS)
    outputs = model({"token_ids": IDS, "padding_mask": MASK}, training=True)
    assert tuple(outputs.shape) == (2, 6, len(TAGS))  # one score row per input position
    with tf.GradientTape() as tape:
        scores = model({"token_ids": IDS, "padding_mask": MASK}, training=True)
        loss = tf.reduce_mean(task.loss_function(model)(LABELS, scores))
    grads = tape.gradient(loss, model.trainable_variables)
    assert np.isfinite(loss.numpy()) and all(g is not None for g in grads)
    assert "crf/transitions" in {v.path for v in model.trainable_variables}


@pytest.mark.slow
def test_train_cli_runs_a_token_task_and_prints_entity_scores(tiny_preset, tmp_path):
    from conftest import run_python

    train = _write_conll(tmp_path / "train.txt", 40, 0)
    proc = run_python(["-m", "kft.train", "--task=token_classification", f"--train_file={train}",
                       f"--backbone={tiny_preset}", f"--model_dir={tmp_path / 'm'}",
                       f"--export_dir={tmp_path / 'x'}", "--batch_size=8", "--nodrift"])
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads(proc.stdout[proc.stdout.index("{"):])
    assert set(summary["eval"]) == {"entity_precision", "entity_recall", "entity_f1", "token_accuracy"}
    assert summary["export"].endswith("/1")


@pytest.mark.parametrize("overrides,message", [
    ({"crf": True}, "--crf applies to --task=token_classification"),
    ({"stride": 8}, "--stride=8 applies to --task=token_classification"),
    ({"task": "token_classification", "pooling": "mean"}, "--pooling=mean applies to --task=classification"),
])
def test_flags_of_the_other_task_are_refused_not_ignored(tiny_preset, tmp_path, overrides, message):
    from conftest import tiny_config
    from kft.training import trainer
    from kft.config import FlagError

    train = _write_conll(tmp_path / "train.txt", 5, 0)
    base = {"dataset": "", "train_file": train} if overrides.get("task") else {}
    with pytest.raises(FlagError, match=message):
        trainer.fit_model(tiny_config(backbone=tiny_preset, epochs=0, **base, **overrides), str(tmp_path / "m"))


def test_a_token_classification_student_distils_per_tagged_word(tiny_preset, tmp_path):
    from conftest import tiny_config
    from kft.training import trainer
    from kft.compression import distillation

    files = dict(dataset="", backbone=tiny_preset, task="token_classification", sequence_length=8, stride=2,
                 train_file=_write_conll(tmp_path / "train.txt", 120, 0),
                 eval_file=_write_conll(tmp_path / "valid.txt", 30, 1), learning_rate=3e-3)
    teacher_dir = str(tmp_path / "teacher")
    trainer.fit_model(tiny_config(**files, epochs=3), teacher_dir)
    fitted = trainer.fit_model(tiny_config(**files, epochs=3, teacher=teacher_dir, student_layers=1,
                                           quantize="int8", export=True, export_dir=str(tmp_path / "exports")),
                               str(tmp_path / "student"))
    metrics = fitted.metrics
    assert metrics["student"]["copied_layers"] == [1]
    cached = np.load(tmp_path / "student" / distillation.CACHE)["log_probabilities"]
    assert cached.ndim == 3 and cached.shape[-1] == 4  # [windows, positions, tags]
    np.testing.assert_allclose(np.exp(cached[:, :2]).sum(-1), 1.0, atol=1e-4)  # real positions
    history = metrics["training"]["history"]
    assert all(np.isfinite(h["loss"]) for h in history) and history[-1]["loss"] < history[0]["loss"]
    assert metrics["eval"]["entity_f1"] > 0.5
    quantized = metrics["quantization"]  # the student quantized, scored and exported too
    assert quantized["eval"]["entity_f1"] == pytest.approx(metrics["eval"]["entity_f1"], abs=0.1)
    served = export.load(quantized["export"]).signatures["serving_default"](text=tf.constant(["Alice visited Acme"]))
    assert served["tags"].shape[0] == 1
