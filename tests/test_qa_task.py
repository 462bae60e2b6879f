"""Extractive question answering: windows, character offsets, decoding, training, export, methods."""

import json
import os

import numpy as np
import pytest
import tensorflow as tf

from conftest import SAMPLE_DIR, run_python
from kft.models import backbones
from kft.data import inputs
from kft.config import Config, FlagError
from kft.tasks.question_answering import data as qa_data, features


@pytest.fixture(scope="module")
def minilm():
    return backbones.load(backbones.BUNDLED_BACKBONE)


@pytest.fixture(scope="module")
def tiny(tiny_preset):
    return backbones.load(tiny_preset)


def _pieces(loaded, texts):
    lengths = tf.constant(features.piece_lengths(loaded.tokenizer.get_vocabulary()))
    return features.context_pieces(inputs._graph_tokenizer(loaded.tokenizer), tf.constant(texts), lengths,
                                   100)


def _review_sentences():
    with open(os.path.join(SAMPLE_DIR, "reviews_train.tsv")) as f:
        return [line.split("\t")[0] for line in f.readlines()[1:]]


def test_windows_cover_every_context_piece_and_every_answer_is_whole_in_some_window(tiny):
    sentences = _review_sentences()
    contexts = [" ".join(sentences[i:i + n]) for i, n in ((0, 2), (10, 9), (40, 25))]
    ids, start, end = _pieces(tiny, contexts)
    question = inputs.word_pieces(tiny.tokenizer, ["what is it about?", "who liked it?", "why?"])
    w = features.windows(question, ids, tiny.packing, 64, 16, 12)
    example, first, offset, length = (x.numpy() for x in (w.example, w.first_piece, w.offset, w.context_length))
    window_ids = w.ids.to_list()
    assert max(len(x) for x in window_ids) <= 64
    for q, context_ids in enumerate(ids.to_list()):
        mine = np.flatnonzero(example == q)
        covered = set()
        for a, b in zip(mine[:-1], mine[1:]):  # consecutive windows share exactly doc_stride pieces
            assert first[a] + length[a] - first[b] == 12
        for wi in mine:
            covered.update(range(first[wi], first[wi] + length[wi]))
            # the window holds [CLS] question [SEP] context-slice [SEP]
            assert window_ids[wi][offset[wi]:offset[wi] + length[wi]] == \
                context_ids[first[wi]:first[wi] + length[wi]]
        assert covered == set(range(len(context_ids)))
        # every span of up to doc_stride + 1 pieces is whole in some window
        for s in range(0, len(context_ids)):
            e = min(len(context_ids) - 1, s + 12)
            assert any(features.window_labels((s, e), int(first[wi]), int(offset[wi]), int(length[wi]))[0] > 0
                       for wi in mine), (q, s, e)
    assert len(np.flatnonzero(example == 2)) >= 3


@pytest.mark.slow
def test_character_offsets_round_trip_for_accented_and_punctuated_text(minilm):
    text = "Frédéric Chopin (1810–1849) était polonais; São Paulo's café — \"naïve\" 北京!"
    ids, start, end = (x.to_list()[0] for x in _pieces(minilm, [text]))
    vocabulary = minilm.tokenizer.get_vocabulary()
    for i, s, e in zip(ids, start, end):
        piece = vocabulary[i].removeprefix("##")
        # the characters a piece spans spell the piece (lower-cased, accents stripped)
        import unicodedata
        plain = "".join(c for c in unicodedata.normalize("NFD", text[s:e].lower()) if not unicodedata.combining(c))
        assert plain == piece, (text[s:e], piece)
    for answer in ("Chopin", "1810–1849", "São Paulo", "café", "naïve", "北京"):
        at = text.index(answer)
        span, exact = features.answer_span(np.array(start), np.array(end), at, at + len(answer))
        assert exact and text[start[span[0]]:end[span[1]]] == answer


def test_graph_decoding_equals_numpy_decoding_and_spans_stay_inside_the_context():
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(40, 30, 2)).astype(np.float32)
    logits[5] = 0.0  # ties everywhere: both take the lowest index
    offset = rng.integers(2, 10, size=40).astype(np.int32)
    length = np.minimum(rng.integers(0, 25, size=40), 29 - offset).astype(np.int32)
    ours = features.best_spans(logits, offset, length, 5, 4)
    graph = features.graph_best_spans(tf.constant(logits), tf.constant(offset), tf.constant(length), 5, 4)
    for a, b in zip(ours, graph):
        np.testing.assert_allclose(a, b.numpy(), rtol=0, atol=1e-6)
    score, s, e, _ = ours
    has = np.isfinite(score)
    assert (length[~has] == 0).all() and has[length > 0].all()
    assert (e[has] >= s[has]).all() and (e[has] - s[has] < 4).all()
    assert (s[has] >= offset[has]).all() and (e[has] < (offset + length)[has]).all()


def _enc(items, offsets=(5,), lengths=(6,), example=(0,)):
    from kft.tasks.question_answering.task import Encoded

    n = len(example)
    return Encoded(qa_data.Questions("eval", "t.jsonl", items), [np.zeros(12, np.int32)] * n, np.zeros((n, 2)),
                   np.array(example), np.zeros(n, np.int64), np.array(offsets), np.array(lengths),
                   [np.arange(6) * 2] * len(items), [np.arange(6) * 2 + 1] * len(items), {})


def test_null_answer_wins_only_when_its_score_beats_the_best_span_by_the_threshold():
    from kft.tasks.question_answering.task import decode

    q = qa_data.Question("q1", "who?", "a b c d e f", [])
    logits = np.full((1, 12, 2), -5.0, np.float32)
    logits[0, 0] = [2.0, 2.0]  # null score 4
    logits[0, 6] = [1.5, -5]
    logits[0, 7] = [-5, 1.5]  # best span: positions 6..7, score 3
    enc = _enc([q])
    assert decode(enc, logits, 20, 30, True, 0.0)["q1"]["text"] == ""
    assert decode(enc, logits, 20, 30, True, 1.5)["q1"] == {"text": "b c", "start": 2, "end": 5, "score": 3.0}
    assert decode(enc, logits, 20, 30, False, 0.0)["q1"]["text"] == "b c"  # SQuAD 1.1: always a span


def test_a_question_is_answered_from_its_best_window():
    from kft.tasks.question_answering.task import decode

    q = qa_data.Question("q1", "who?", "a b c d e f", [("e", 8)])
    logits = np.full((2, 12, 2), -5.0, np.float32)
    logits[0, 5] = [1.0, 1.0]  # window 0: piece 0, score 2
    logits[1, 8] = [3.0, 3.0]  # window 1 (its context starts at piece 1): position 8 = piece 4, score 6
    enc = _enc([q], offsets=(5, 5), lengths=(6, 5), example=(0, 0))
    enc.first_piece = np.array([0, 1])
    assert decode(enc, logits, 20, 30, False, 0.0)["q1"]["text"] == "e"


def test_question_answering_flags_are_refused_for_other_tasks():
    from kft import config as config_lib

    with pytest.raises(FlagError, match="--doc_stride=64 applies to --task=question_answering"):
        config_lib.check_task_flags(Config(doc_stride=64))


# -- end to end on a tiny model --------------------------------------------------------------------

def _write_questions(path, n, long_context=False, seed=0, unanswerable_every=0):
    """Questions whose answer is a word of review sentences (words the tiny vocabulary knows);
    with `unanswerable_every=k`, every k-th question has no answer (SQuAD 2.0 style)."""
    sentences = _review_sentences()
    rng = np.random.default_rng(seed)
    rows = []
    for i in range(n):
        k = 14 if long_context and i == 0 else 2
        start = int(rng.integers(0, len(sentences) - k))
        context = " ".join(sentences[start:start + k])
        words = context.split()
        j = int(rng.integers(0, len(words)))
        at = len(" ".join(words[:j])) + (1 if j else 0)
        rows.append({"id": f"q{seed}-{i}", "question": f"where is {words[0]} ?", "context": context,
                     "answers": [] if unanswerable_every and i % unanswerable_every == 1 else
                     [{"text": words[j], "answer_start": at}]})
    with open(path, "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in rows)
    return str(path)


def _qa_config(tiny_preset, tmp_path, **overrides):
    base = dict(task="question_answering", backbone=tiny_preset,
                train_file=_write_questions(tmp_path / "train.jsonl", 24),
                eval_file=_write_questions(tmp_path / "dev.jsonl", 6, long_context=True, seed=1),
                sequence_length=48, max_query_length=8, doc_stride=8, epochs=1, batch_size=8,
                learning_rate=1e-3, warmup_ratio=0.0, export=False, seed=3, drift=False,
                export_dir=str(tmp_path / "exports"), run_name="qa")
    base.update(overrides)
    return Config(**base)


@pytest.fixture(scope="module")
def null_answer_run(tiny_preset, tmp_path_factory):
    """Four epochs with unanswerable questions, exported: (config, metrics, run folder)."""
    from kft.training import trainer

    tmp_path = tmp_path_factory.mktemp("qa_null_answers")
    # unanswerable questions in train turn on null answers, in evaluation and in the serving graph
    config = _qa_config(tiny_preset, tmp_path, epochs=4, export=True,
                        train_file=_write_questions(tmp_path / "train2.jsonl", 24, unanswerable_every=4),
                        eval_file=_write_questions(tmp_path / "dev2.jsonl", 6, long_context=True, seed=1,
                                                   unanswerable_every=3))
    return config, trainer.train_and_evaluate(config, str(tmp_path / "run")), tmp_path / "run"


def test_training_with_unanswerable_questions_reduces_the_loss_and_writes_every_answer(null_answer_run):
    _, metrics, run = null_answer_run
    assert metrics["eval"]["no_ans_questions"] == 2
    history = metrics["training"]["history"]
    assert history[-1]["loss"] < history[0]["loss"]
    assert metrics["data"]["eval"]["max_windows_per_question"] >= 3
    assert set(json.load(open(run / "predictions.json"))) == {f"q1-{i}" for i in range(6)}
    assert os.path.exists(run / "f1_by_context_length.png")


@pytest.mark.slow
def test_the_export_answers_in_a_fresh_process_as_the_in_memory_model(null_answer_run, tmp_path):
    config, metrics, run = null_answer_run
    in_memory = [json.loads(line) for line in open(run / "answers.jsonl")]
    script = tmp_path / "serve.py"
    script.write_text(
        "import json, sys\n"
        "import tensorflow as tf, tensorflow_text  # noqa: F401\n"
        "m = tf.saved_model.load(sys.argv[1]); f = m.signatures['serving_default']\n"
        "rows = [json.loads(l) for l in open(sys.argv[2])]\n"
        "out = f(question=tf.constant([r['question'] for r in rows]), context=tf.constant([r['context'] for r in rows]))\n"
        "print(json.dumps([{'text': a.decode(), 'start': int(s), 'end': int(e), 'score': float(c)} for a, s, e, c in "
        "zip(out['answer'].numpy(), out['start_char'].numpy(), out['end_char'].numpy(), out['score'].numpy())]))\n"
        "empty = f(question=tf.constant([], tf.string), context=tf.constant([], tf.string))\n"
        "blank = f(question=tf.constant(['']), context=tf.constant(['']))\n"
        "print(json.dumps([int(empty['answer'].shape[0]), blank['answer'].numpy()[0].decode()]))\n")
    done = run_python([str(script), metrics["export"], config.eval_file])
    assert done.returncode == 0, done.stderr[-3000:]
    served, edge = (json.loads(line) for line in done.stdout.strip().splitlines()[-2:])
    for mine, theirs in zip(in_memory, served):
        assert (mine["text"], mine["start"], mine["end"]) == (theirs["text"], theirs["start"], theirs["end"])
        assert abs(mine["score"] - theirs["score"]) < 1e-4 * max(1.0, abs(mine["score"]))
    assert edge == [0, ""]
    predicted = run_python(["-m", "kft.predict", f"--model={metrics['export']}",
                            f"--input_file={config.eval_file}"])
    assert predicted.returncode == 0, predicted.stderr[-3000:]
    lines = [json.loads(line) for line in predicted.stdout.strip().splitlines()]
    assert [(r["id"], r["answer"], r["start"]) for r in lines] == \
        [(m["id"], m["text"], m["start"]) for m in in_memory]


def _write_learnable_questions(path, n, seed=0):
    """Questions a tiny model can learn in a few epochs: the answer is always the word after the
    context's opening article ("The *movie* is ..."), so it sits at the context's second piece."""
    rng = np.random.default_rng(seed)
    pool = [s for s in _review_sentences() if s.split()[0].lower() in ("the", "a", "an") and s.split()[1].isalpha()]
    rows = []
    for i in range(n):
        a, b = rng.choice(len(pool), 2, replace=False)
        context = pool[a] + " " + pool[b]
        words = context.split()
        rows.append({"id": f"q{seed}-{i}", "question": f"where is {words[0]} ?", "context": context,
                     "answers": [{"text": words[1], "answer_start": len(words[0]) + 1}]})
    with open(path, "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in rows)
    return str(path)


def _squad_scores(answers, questions):
    """EM and F1 (percent) computed here from the decoded spans, as SQuAD v1.1's script does."""
    import collections
    import re
    import string

    def norm(text):
        text = "".join(c for c in text.lower() if c not in set(string.punctuation))
        return re.sub(r"\b(a|an|the)\b", " ", text).split()

    em = f1 = 0.0
    for q in questions:
        predicted = norm(answers[q["id"]]["text"])
        best_em = best_f1 = 0.0
        for gold in (norm(a["text"]) for a in q["answers"]):
            best_em = max(best_em, float(predicted == gold))
            common = sum((collections.Counter(predicted) & collections.Counter(gold)).values())
            if common:
                precision, recall = common / len(predicted), common / len(gold)
                best_f1 = max(best_f1, 2 * precision * recall / (precision + recall))
        em, f1 = em + best_em, f1 + best_f1
    return 100.0 * em / len(questions), 100.0 * f1 / len(questions)


def _learned_questions_config(tiny_preset, tmp_path, **overrides):
    train = _write_learnable_questions(tmp_path / "learnable.jsonl", 24)
    return _qa_config(tiny_preset, tmp_path, train_file=train, eval_file=train, **overrides)


@pytest.fixture(scope="module")
def untrained_on_learnable_questions(tiny_preset, tmp_path_factory):
    """The tiny model's scores on the learnable questions before any training (--epochs=0)."""
    from kft.training import trainer

    tmp_path = tmp_path_factory.mktemp("qa_untrained")
    config = _learned_questions_config(tiny_preset, tmp_path, epochs=0)
    return trainer.train_and_evaluate(config, str(tmp_path / "run"))["eval"]


# full adapts every weight; prompt and prefix change the sequence the span head reads (inserted
# positions, per-layer keys and values), so the spans must be mapped back past them. lora, bitfit and
# freeze leave the layout as full does; tests/test_methods.py covers what each of them trains.
@pytest.mark.parametrize("method,learning_rate", [("full", 1e-2), ("prompt", 1e-1), ("prefix", 1e-1)])
def test_each_tuning_method_learns_the_training_questions_and_scores_its_spans_as_squad_does(
        tiny_preset, tmp_path, method, learning_rate, untrained_on_learnable_questions):
    from kft.training import trainer

    overrides = {"method": method}
    if method in ("prompt", "prefix"):
        overrides.update(num_prompt_tokens=4, prefix_length=4)
    config = _learned_questions_config(tiny_preset, tmp_path, epochs=4, learning_rate=learning_rate, **overrides)
    metrics = trainer.train_and_evaluate(config, str(tmp_path / "run"))
    report, untrained = metrics["eval"], untrained_on_learnable_questions
    # trained on these questions, it answers them; untrained, it does not
    assert untrained["exact_match"] <= 25.0
    assert report["exact_match"] >= 60.0 and report["f1"] > untrained["f1"] + 25.0, (report, untrained)
    # every decoded span is the context's own characters, and EM/F1 are those spans scored as SQuAD does
    questions = [json.loads(line) for line in open(config.eval_file)]
    answers = {a["id"]: a for a in map(json.loads, open(tmp_path / "run" / "answers.jsonl"))}
    assert set(answers) == {q["id"] for q in questions}
    for q in questions:
        a = answers[q["id"]]
        assert 0 <= a["start"] < a["end"] <= len(q["context"]) and q["context"][a["start"]:a["end"]] == a["text"]
    em, f1 = _squad_scores(answers, questions)
    assert (report["exact_match"], report["f1"]) == (pytest.approx(em), pytest.approx(f1))


@pytest.mark.slow
def test_bad_question_answering_data_exits_2_naming_the_file_and_the_question(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"id": "q-7", "question": "who?", "context": "Ada wrote it.",
                               "answers": [{"text": "Grace", "answer_start": 0}]}) + "\n")
    done = run_python(["-m", "kft.train", "--task=question_answering", f"--train_file={bad}",
                       f"--model_dir={tmp_path / 'run'}"])
    assert done.returncode == 2, done.stderr[-2000:]
    assert "bad.jsonl:1" in done.stderr and "q-7" in done.stderr
    assert "Traceback" not in done.stderr


SQUAD = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "..", "shared", "data", "squad")


@pytest.mark.slow
@pytest.mark.skipif(not os.path.exists(os.path.join(SQUAD, "train.json")),
                    reason="../shared/data/squad/ (SQuAD 1.1) is not present")
def test_bundled_minilm_on_squad_serves_the_answers_it_was_evaluated_with(tmp_path):
    """End to end on real data: the bundled MiniLM, SQuAD train -> dev, export in a fresh process."""
    from kft.training import trainer

    config = Config(task="question_answering", train_file=os.path.join(SQUAD, "train.json"),
                    eval_file=os.path.join(SQUAD, "dev.json"), max_train_examples=64, max_eval_examples=40,
                    sequence_length=192, doc_stride=64, epochs=1, batch_size=16, learning_rate=1e-4,
                    export_dir=str(tmp_path / "exports"), run_name="squad", drift=False)
    metrics = trainer.train_and_evaluate(config, str(tmp_path / "run"))
    assert metrics["data"]["eval"]["questions_in_several_windows"] > 0
    assert 0.0 <= metrics["eval"]["f1"] <= 100.0
    in_memory = [json.loads(line) for line in open(tmp_path / "run" / "answers.jsonl")]
    questions = qa_data.read_file(config.eval_file, "eval", "--eval_file").head(40)
    with open(tmp_path / "dev.jsonl", "w") as f:
        f.writelines(json.dumps({"id": q.id, "question": q.question, "context": q.context}) + "\n"
                     for q in questions.items)
    done = run_python(["-m", "kft.predict", f"--model={metrics['export']}", f"--input_file={tmp_path / 'dev.jsonl'}"])
    assert done.returncode == 0, done.stderr[-3000:]
    served = [json.loads(line) for line in done.stdout.strip().splitlines()]
    assert [(s["id"], s["answer"], s["start"], s["end"]) for s in served] == \
        [(m["id"], m["text"], m["start"], m["end"]) for m in in_memory]
