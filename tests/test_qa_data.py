"""Reading extractive-QA data (SQuAD JSON, JSONL, TFDS squad) and SQuAD's exact match / F1."""

import json
import os

import pytest

from conftest import SHARED_DATA
from kft.data.sources import DataError
from kft.tasks.question_answering import data as qa_data
from kft.tasks.question_answering import scoring

CONTEXT = "The Eiffel Tower is in Paris. Paris is the capital of France."


def squad(questions, context=CONTEXT, title="Paris", version="1.1"):
    return {"version": version, "data": [{"title": title, "paragraphs": [{"context": context,
                                                                         "qas": questions}]}]}


def qa(qid, question="Where is the Eiffel Tower?", answers=(("Paris", 23),), **extra):
    return {"id": qid, "question": question,
            "answers": [{"text": t, "answer_start": s} for t, s in answers], **extra}


def write(tmp_path, name, content):
    path = tmp_path / name
    path.write_text(content if isinstance(content, str) else json.dumps(content, indent=1))
    return str(path)


def jsonl(tmp_path, rows, name="q.jsonl"):
    return write(tmp_path, name, "\n".join(r if isinstance(r, str) else json.dumps(r) for r in rows) + "\n")


def line(**fields):
    return {"question": "Where is the Eiffel Tower?", "context": CONTEXT, **fields}


# -- formats --

def test_squad_v1_json_questions_answers_and_titles(tmp_path):
    path = write(tmp_path, "train.json", squad([
        qa("q1", answers=[("Paris", 23), ("Paris", 30), ("in Paris", 20)]),
        qa("q2", "What is Paris the capital of?", [("France", 54)])]))
    split = qa_data.read_file(path, "train", "--train_file")
    assert (split.name, split.source, len(split), split.unanswerable, split.repaired) == (
        "train", path, 2, 0, 0)
    first = split.items[0]
    assert first.id == "q1" and first.context == CONTEXT and first.title == "Paris"
    assert first.answers == [("Paris", 23), ("Paris", 30), ("in Paris", 20)]  # all kept, as given
    assert first.where == f"{path} (question id q1)"
    assert split.items[1].answers == [("France", 54)]
    assert split.head(1).items == split.items[:1] and len(split.head(0)) == 2


def test_squad_v2_json_impossible_question_has_no_answers(tmp_path):
    impossible = {"id": "q2", "question": "Where is the Louvre?", "answers": [], "is_impossible": True,
                  "plausible_answers": [{"text": "Paris", "answer_start": 23}]}
    path = write(tmp_path, "dev.json", squad([qa("q1", is_impossible=False), impossible], version="v2.0"))
    split = qa_data.read_file(path, "eval", "--eval_file")
    assert [q.answers for q in split.items] == [[("Paris", 23)], []]
    assert split.unanswerable == 1


def test_jsonl_with_answers_lists(tmp_path):
    path = jsonl(tmp_path, [line(id="a", answers=[{"text": "France", "answer_start": 54}], title="T"),
                            "", line(answers=[])])
    split = qa_data.read_file(path, "train", "--train_file")
    assert [q.id for q in split.items] == ["a", "3"]  # no id: the line number
    assert split.items[0].answers == [("France", 54)] and split.items[0].title == "T"
    assert split.items[1].answers == [] and split.unanswerable == 1
    assert split.items[1].where == f"{path}:3"


def test_jsonl_with_answer_and_answer_start_even_named_json(tmp_path):
    path = jsonl(tmp_path, [line(id=7, answer="Paris", answer_start=23),
                            line(id="x", answer="France", answer_start=54)], name="q.json")
    split = qa_data.read_file(path, "train", "--train_file")
    assert [(q.id, q.answers) for q in split.items] == [("7", [("Paris", 23)]), ("x", [("France", 54)])]


def test_a_single_line_jsonl_file_is_read_as_jsonl(tmp_path):
    path = write(tmp_path, "one.json", json.dumps(line(answer="Paris", answer_start=23)))
    assert qa_data.read_file(path, "train", "--train_file").items[0].answers == [("Paris", 23)]


# -- validation: every error names the file, the question id (and line) and the field --

@pytest.mark.parametrize("qas,message", [
    ([qa("q1", answers=[("Paris", 3)])],
     r"bad.json \(question id q1\): field 'answers\[0\]': answer 'Paris' is not at answer_start 3; "
     r"the context there reads ' Eiffel Tower is in '; it occurs at 23, 30 \(--fix_answer_offsets"),
    ([qa("q1", answers=[("Paris", 99)])],
     r"bad.json \(question id q1\): field 'answers\[0\].answer_start': 99 is out of range for a context "
     r"of 61 characters"),
    ([qa("q1", answers=[("Paris", "23")])],
     r"bad.json \(question id q1\): field 'answers\[0\].answer_start': expected an integer .*\"23\""),
    ([qa("q1", answers=[("Paris", 23.0)])], r"\(question id q1\): field 'answers\[0\].answer_start'"),
    ([qa("q1", answers=[(" ", 23)])],
     r"bad.json \(question id q1\): field 'answers\[0\].text': the answer text is empty"),
    ([qa("q1", answers=[("London", 23)])],
     r"bad.json \(question id q1\): field 'answers\[0\]': answer 'London' is not at .* does not occur"),
    ([qa("q1", question="  ")], r"bad.json \(question id q1\): field 'question' is empty"),
    ([qa("q1", question=5)], r"bad.json \(question id q1\): field 'question': expected a string, got int"),
    ([{"id": "q1", "question": "Where?"}], r"bad.json \(question id q1\): missing field 'answers'"),
    ([{"question": "Where?", "answers": []}],
     r"bad.json \(data\[0\].paragraphs\[0\].qas\[0\]\): missing field 'id'"),
    ([qa("q1", answers=[("Paris", 23)], is_impossible=True)],
     r"bad.json \(question id q1\): field 'answers': is_impossible is true but it has 1 answer"),
])
def test_bad_squad_json_names_file_question_and_field(tmp_path, qas, message):
    with pytest.raises(DataError, match=message):
        qa_data.read_file(write(tmp_path, "bad.json", squad(qas)), "train", "--train_file")


@pytest.mark.parametrize("context,message", [
    (" \n", r"bad.json \(data\[0\].paragraphs\[0\], question id q1\): field 'context' is empty"),
    (["a"], r"bad.json \(data\[0\].paragraphs\[0\], question id q1\): field 'context': expected a string"),
])
def test_bad_context_names_a_question_of_its_paragraph(tmp_path, context, message):
    with pytest.raises(DataError, match=message):  # before any answer is looked for in it
        qa_data.read_file(write(tmp_path, "bad.json", squad([qa("q1")], context)), "t", "--f")


@pytest.mark.parametrize("row,message", [
    (line(id="q9", answer="Paris", answer_start=4),
     r"bad.jsonl:2 \(question id q9\): field 'answer': answer 'Paris' is not at answer_start 4"),
    (line(id="q9", answer="Paris"), r"bad.jsonl:2 \(question id q9\): missing field 'answer_start'"),
    (line(id="q9"), r"bad.jsonl:2 \(question id q9\): missing field 'answers' \(or 'answer'"),
    ({"id": "q9", "question": "Where?", "answers": []}, r"bad.jsonl:2 \(question id q9\): missing field "
                                                         r"'context'"),
    (line(id="q9", context="", answer="Paris", answer_start=23),
     r"bad.jsonl:2 \(question id q9\): field 'context' is empty"),
    (line(id="q9", question=None, answers=[]),
     r"bad.jsonl:2 \(question id q9\): field 'question': expected a string, got NoneType"),
    (line(id="q9", answers={"text": "Paris"}), r"bad.jsonl:2 \(question id q9\): field 'answers': expected "
                                               r"a list"),
    (line(id="q9", answers=[{"text": "Paris"}]),
     r"bad.jsonl:2 \(question id q9\): field 'answers\[0\]': missing 'answer_start'"),
    (line(id="q9", answer="", answer_start=0), r"bad.jsonl:2 \(question id q9\): field 'answer.text': the "
                                               r"answer text is empty"),
    (line(id="q9", answer="Paris", answer_start=-1),
     r"bad.jsonl:2 \(question id q9\): field 'answer.answer_start': -1 is out of range"),
    ('{"question": "Where?", ', r"bad.jsonl:2: not valid JSON \(.* at column \d+\)"),
])
def test_bad_jsonl_names_file_line_question_and_field(tmp_path, row, message):
    path = jsonl(tmp_path, [line(id="q1", answers=[]), row], name="bad.jsonl")
    with pytest.raises(DataError, match=message):
        qa_data.read_file(path, "train", "--train_file")


def test_malformed_squad_json_names_line_and_column(tmp_path):
    path = write(tmp_path, "broken.json", '{"data": [\n  {"title": "x",\n   "paragraphs": [}\n]}\n')
    with pytest.raises(DataError, match=r"broken.json:3: not valid JSON \(.* at line 3, column 19\)"):
        qa_data.read_file(path, "train", "--train_file")


@pytest.mark.parametrize("name,content,message", [
    ("empty.json", " \n", r"--eval_file=.*empty.json: the file is empty"),
    ("none.json", squad([]), r"--eval_file=.*none.json: no questions"),
    ("list.json", "[1, 2]", r"list.json: neither SQuAD JSON .* found list"),
    ("other.json", '{"version": "1.1"}', r"other.json: neither SQuAD JSON .* found \['version'\]"),
])
def test_a_file_without_questions_is_an_error(tmp_path, name, content, message):
    with pytest.raises(DataError, match=message):
        qa_data.read_file(write(tmp_path, name, content), "eval", "--eval_file")


def test_a_missing_file_names_the_flag(tmp_path):
    with pytest.raises(DataError, match=r"--eval_file=.*nowhere.json: no such file"):
        qa_data.read_file(str(tmp_path / "nowhere.json"), "eval", "--eval_file")


def test_bytes_that_are_not_utf8_name_the_line(tmp_path):
    path = tmp_path / "latin1.jsonl"
    path.write_bytes(json.dumps(line(answers=[])).encode() + b'\n{"question": "caf\xe9"}\n')
    with pytest.raises(DataError, match=r"latin1.jsonl:2: bytes that are not UTF-8"):
        qa_data.read_file(str(path), "train", "--train_file")


def test_duplicate_ids_name_both_places(tmp_path):
    path = jsonl(tmp_path, [line(id="d", answers=[]), line(id="e", answers=[]), line(id="d", answers=[])])
    with pytest.raises(DataError, match=r"q.jsonl:3 \(question id d\): duplicate question id 'd': at "
                                        r".*q.jsonl:3 and at .*q.jsonl:1$"):
        qa_data.read_file(path, "train", "--train_file")
    document = squad([qa("d")], title="First")
    document["data"].append(squad([qa("e"), qa("d")], title="Second")["data"][0])
    with pytest.raises(DataError, match=r"dup.json \(question id d\): duplicate question id 'd': at "
                                        r"data\[1\].paragraphs\[0\].qas\[1\] \(title 'Second'\) and at "
                                        r"data\[0\].paragraphs\[0\].qas\[0\] \(title 'First'\)"):
        qa_data.read_file(write(tmp_path, "dup.json", document), "train", "--train_file")


# -- repairing offsets --

def test_fix_offsets_moves_answers_to_the_nearest_occurrence_and_counts(tmp_path):
    path = write(tmp_path, "off.json", squad([
        qa("q1", answers=[("Paris", 22), ("Paris", 28), ("Paris", 23)]),  # 23 and 30 are right
        qa("q2", "Of what?", [("France", 60)])]))  # 60 + 6 runs past the end: still repaired
    with pytest.raises(DataError, match=r"question id q1"):
        qa_data.read_file(path, "train", "--train_file")
    split = qa_data.read_file(path, "train", "--train_file", fix_offsets=True)
    assert split.items[0].answers == [("Paris", 23), ("Paris", 30), ("Paris", 23)]
    assert split.items[1].answers == [("France", 54)]
    assert split.repaired == 3 and split.head(1).repaired == 3
    for q in split.items:
        assert all(q.context[s:s + len(t)] == t for t, s in q.answers)


def test_fix_offsets_cannot_repair_text_that_is_not_in_the_context(tmp_path):
    path = jsonl(tmp_path, [line(id="q1", answer="Lyon", answer_start=23)])
    with pytest.raises(DataError, match=r"q.jsonl:1 \(question id q1\): field 'answer': .*does not occur in "
                                        r"the context at all, so --fix_answer_offsets cannot repair it"):
        qa_data.read_file(path, "train", "--train_file", fix_offsets=True)


# -- scoring --

@pytest.mark.parametrize("text,normal", [
    ("The Eiffel Tower", "eiffel tower"),
    ("  an  apple,\ta pear! ", "apple pear"),
    ("Theatre; anthem: THE end.", "theatre anthem end"),  # articles only as whole words
    ("U.S.A.", "usa"),
    ("the", ""),
])
def test_normalize_answer_follows_squad(text, normal):
    assert scoring.normalize_answer(text) == normal


def test_exact_match_and_f1_take_the_best_reference():
    assert scoring.exact_match("the Eiffel tower.", ["Eiffel Tower"]) == 1.0
    assert scoring.exact_match("Tower", ["Eiffel Tower", "Paris"]) == 0.0
    assert scoring.exact_match("paris", ["Eiffel Tower", "Paris!"]) == 1.0
    # "in paris france" vs "paris": precision 1/3, recall 1 -> F1 = 2 * (1/3) / (4/3) = 0.5
    assert scoring.f1("in Paris, France", ["Paris"]) == pytest.approx(0.5)
    # vs "capital of france": common {france}: P 1/3, R 1/3 -> 1/3; the best is 0.5
    assert scoring.f1("in Paris, France", ["the capital of France", "Paris"]) == pytest.approx(0.5)
    # repeated tokens count at most as often as in both: "paris paris" vs "paris": P 1/2, R 1 -> 2/3
    assert scoring.f1("Paris Paris", ["Paris"]) == pytest.approx(2 / 3)
    assert scoring.f1("London", ["Paris"]) == 0.0


def test_unanswerable_questions_score_only_the_empty_answer():
    assert scoring.exact_match("", []) == scoring.f1("", []) == 1.0
    assert scoring.exact_match("the", []) == scoring.f1(" a ", []) == 1.0  # normalises to ""
    assert scoring.exact_match("Paris", []) == scoring.f1("Paris", []) == 0.0
    assert scoring.f1("", ["Paris"]) == 0.0


def test_report_splits_answerable_and_unanswerable_questions(tmp_path):
    path = jsonl(tmp_path, [line(id="a", answer="Paris", answer_start=23),
                            line(id="b", answer="Eiffel Tower", answer_start=4),
                            line(id="c", answers=[]), line(id="d", answers=[])])
    questions = qa_data.read_file(path, "eval", "--eval_file")
    report = scoring.report({"a": "Paris", "b": "Tower", "c": "", "x": "ignored"}, questions)
    # a: EM 1 F1 1; b: EM 0 F1 2/3; c (no answer, empty): 1 1; d missing -> "" -> 1 1
    assert report == pytest.approx({
        "exact_match": 75.0, "f1": 100 * (1 + 2 / 3 + 1 + 1) / 4, "questions": 4, "answered": 2,
        "missing": 1, "has_ans_exact_match": 50.0, "has_ans_f1": 100 * (1 + 2 / 3) / 2,
        "has_ans_questions": 2, "no_ans_exact_match": 100.0, "no_ans_f1": 100.0, "no_ans_questions": 2})
    answerable = questions.head(2)
    assert set(scoring.report({}, answerable)) == {"exact_match", "f1", "questions", "answered", "missing"}
    assert scoring.report({}, answerable)["missing"] == 2


# -- TFDS and the shared SQuAD files --

def test_tfds_squad_reads_through_tfds():
    import tensorflow as tf
    import tensorflow_datasets as tfds

    rows = [(b"q1", b"Where is the Eiffel Tower?", [b"Paris", b"Paris"], [23, 30]),
            (b"q2", b"Of what is Paris the capital?", [b"France"], [54])]

    def as_dataset(self, split, **kwargs):  # squad's features, two fixed questions
        def generate():
            for qid, question, texts, starts in rows:
                yield {"id": qid, "title": b"Paris", "context": CONTEXT.encode(), "question": question,
                       "answers": {"text": texts, "answer_start": starts}}
        return tf.data.Dataset.from_generator(generate, output_signature={
            "id": tf.TensorSpec([], tf.string), "title": tf.TensorSpec([], tf.string),
            "context": tf.TensorSpec([], tf.string), "question": tf.TensorSpec([], tf.string),
            "answers": {"text": tf.TensorSpec([None], tf.string),
                        "answer_start": tf.TensorSpec([None], tf.int32)}})

    with tfds.testing.mock_data(as_dataset_fn=as_dataset):
        split = qa_data.read_tfds("squad", "validation")
    assert split.source == "tfds:squad/validation" and len(split) == 2
    first = split.items[0]
    assert (first.id, first.title, first.context) == ("q1", "Paris", CONTEXT)
    assert first.answers == [("Paris", 23), ("Paris", 30)] and split.items[1].answers == [("France", 54)]
    assert first.where == "tfds:squad/validation (question id q1)"
    with tfds.testing.mock_data(num_examples=4):  # random answers: not found at their offsets
        with pytest.raises(DataError, match=r"tfds:squad/train \(question id .*\): field 'answers"):
            qa_data.read_tfds("squad", "train")


def test_tfds_download_failure_is_a_data_error(monkeypatch):
    import tensorflow_datasets as tfds

    def offline(self, *args, **kwargs):
        raise ConnectionError("Failed to resolve host")

    monkeypatch.setattr(tfds.core.DatasetBuilder, "download_and_prepare", offline)
    with pytest.raises(DataError, match=r"tfds:squad/v1.1: could not download and prepare it"):
        qa_data.read_tfds("squad/v1.1", "train", "/nonexistent/tfds")


SQUAD_TRAIN = os.path.join(SHARED_DATA, "squad", "train.json")


@pytest.mark.skipif(not os.path.exists(SQUAD_TRAIN), reason=f"{SQUAD_TRAIN} is not present")
def test_shared_squad_train_file_reads_whole():
    split = qa_data.read_file(SQUAD_TRAIN, "train", "--train_file")
    assert len(split) == 7970 and len({q.title for q in split.items}) == 33
    assert split.repaired == 0 and split.unanswerable == 0
