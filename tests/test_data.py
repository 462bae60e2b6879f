"""Reading and validating labelled text: every bad input names file, line and field."""

import json

import numpy as np
import pytest

from conftest import tiny_config
from kft.data import sources as data
from kft.data.sources import DataError


def write(tmp_path, name, content, mode="w"):
    path = tmp_path / name
    if mode == "wb":
        path.write_bytes(content)
    else:
        path.write_text(content)
    return str(path)


def test_tsv_with_int_labels_reads_as_ints(tmp_path):
    path = write(tmp_path, "t.tsv", "sentence\tlabel\na fine film \"really\"\t1\nawful\t0\n")
    split = data.read_file(path, "train", "sentence", "label")
    assert split.texts == ['a fine film "really"', "awful"]  # TSV is unquoted, GLUE style
    assert split.labels == [1, 0]
    assert split.lines == [2, 3]


def test_csv_with_quoted_fields_and_string_labels(tmp_path):
    path = write(tmp_path, "t.csv", 'text,label\n"good, very good",pos\n"multi\nline",neg\nbad,neg\n')
    split = data.read_file(path, "train", "text", "label")
    assert split.texts == ["good, very good", "multi\nline", "bad"]
    assert split.labels == ["pos", "neg", "neg"]
    assert split.lines == [2, 3, 5]


def test_jsonl_reads_typed_labels(tmp_path):
    path = write(tmp_path, "t.jsonl", '{"text": "good", "label": 1}\n\n{"text": "bad", "label": 0}\n')
    split = data.read_file(path, "train", "text", "label")
    assert split.labels == [1, 0] and split.lines == [1, 3]


@pytest.mark.parametrize("name,content,expected", [
    ("t.tsv", "text\tlabel\nfine\t1\n", "t.tsv:1: header has no field 'sentence' (--text_field)"),
    ("t.tsv", "sentence\tlabel\nfine\t1\n  \t0\n", "t.tsv:3: field 'sentence' is empty"),
    ("t.tsv", "sentence\tlabel\nfine\t1\nbad\tneg\n", "t.tsv:3: field 'label': label 'neg' is a string"),
    ("t.tsv", "sentence\tlabel\nfine\t1\nbad\n", "t.tsv:3: 1 fields, header has 2"),
    ("t.tsv", "sentence\tlabel\nfine\t\n", "t.tsv:2: field 'label' is empty"),
    ("t.jsonl", '{"sentence": "a", "label": 1}\n{"sentence": "b", "label": "x"}\n',
     "t.jsonl:2: field 'label': label 'x' is a string"),
    ("t.jsonl", '{"sentence": "a", "label": 1}\n{"sentence": "b" "label": 0}\n', "t.jsonl:2: not valid JSON"),
    ("t.jsonl", '{"sentence": "a", "label": 1}\n{"sentence": "b"}\n', "t.jsonl:2: missing field 'label'"),
    ("t.jsonl", '{"sentence": "a", "label": [1]}\n', "t.jsonl:1: field 'label': expected an int or string"),
    ("t.csv", 'sentence,label\n"unbalanced,1\nok,0\n', "t.csv:2: malformed CSV"),
    ("t.txt", "sentence\tlabel\n", "unsupported extension '.txt'"),
    ("t.tsv", "\n  \n", "t.tsv: file is empty"),
    ("t.tsv", "sentence\tlabel\n", "t.tsv: no examples after the header"),
])
def test_bad_file_names_file_line_and_field(tmp_path, name, content, expected):
    path = write(tmp_path, name, content)
    with pytest.raises(DataError) as e:
        data.read_file(path, "train", "sentence", "label")
    assert expected in str(e.value)
    assert str(tmp_path) in str(e.value)


def test_undecodable_bytes_name_line_and_field(tmp_path):
    path = write(tmp_path, "t.tsv", b"sentence\tlabel\nfine\t1\nbad \xff\xfe bytes\t0\n", mode="wb")
    with pytest.raises(DataError, match=r"t\.tsv:3: field 'sentence': bytes that are not valid UTF-8"):
        data.read_file(path, "train", "sentence", "label")


def test_missing_file_names_the_flag(tmp_path):
    with pytest.raises(DataError, match=r"nope\.tsv: file not found \(given by --eval_file\)"):
        data.read_file(str(tmp_path / "nope.tsv"), "eval", "sentence", "label", "--eval_file")


def test_label_vocabulary_is_built_from_train_and_sorted():
    split = data.Split("train", "x", ["a", "b", "c"], ["pos", "neg", "pos"])
    vocab = data.LabelVocab.from_split(split)
    assert vocab.values == ["neg", "pos"] and vocab.names == ["neg", "pos"]
    np.testing.assert_array_equal(vocab.encode(split), [1, 0, 1])
    assert data.LabelVocab.from_json(json.loads(json.dumps(vocab.to_json()))) == vocab


def test_label_names_name_integer_labels():
    split = data.Split("train", "x", ["a", "b"], [1, 0])
    vocab = data.LabelVocab.from_split(split, ["negative", "positive"])
    assert vocab.names == ["negative", "positive"]
    with pytest.raises(DataError, match="--label_names has 1 names"):
        data.LabelVocab.from_split(split, ["only"])


def test_eval_label_unseen_in_train_is_an_error_before_training(tmp_path):
    train = write(tmp_path, "train.tsv", "sentence\tlabel\ngood\tpos\nbad\tneg\n")
    eval_ = write(tmp_path, "dev.tsv", "sentence\tlabel\nok\tpos\nmeh\tneutral\n")
    config = tiny_config(dataset="", train_file=train, eval_file=eval_)
    with pytest.raises(DataError, match=r"dev\.tsv:3: field 'label': label 'neutral' does not occur"):
        data.load(config)


def test_eval_labels_of_another_type_are_an_error(tmp_path):
    train = write(tmp_path, "train.tsv", "sentence\tlabel\ngood\tpos\nbad\tneg\n")
    eval_ = write(tmp_path, "dev.tsv", "sentence\tlabel\nok\t1\n")
    with pytest.raises(DataError, match=r"dev\.tsv:2: field 'label'.*different type"):
        data.load(tiny_config(dataset="", train_file=train, eval_file=eval_))


def test_num_classes_must_agree_with_the_data(tmp_path):
    with pytest.raises(DataError, match=r"--num_classes=3 but .* has 2 distinct labels"):
        data.load(tiny_config(num_classes=3))


def test_dataset_and_files_together_are_refused(tmp_path):
    with pytest.raises(DataError, match="either --dataset or --train_file"):
        data.load(tiny_config(train_file="x.tsv"))


def test_sample_dataset_is_balanced_with_held_out_part():
    loaded = data.load(tiny_config())
    assert loaded.vocab.names == ["negative", "positive"]
    train_counts = data.label_distribution(loaded.vocab.encode(loaded.train), loaded.vocab)
    eval_counts = data.label_distribution(loaded.vocab.encode(loaded.eval), loaded.vocab)
    assert train_counts == {"negative": 120, "positive": 120}
    assert eval_counts == {"negative": 30, "positive": 30}
    assert not set(loaded.train.texts) & set(loaded.eval.texts)


def test_holdout_is_stratified_and_seeded(tmp_path):
    rows = "".join(f"text {i}\t{'a' if i % 4 else 'b'}\n" for i in range(200))
    train = write(tmp_path, "train.tsv", "sentence\tlabel\n" + rows)
    one = data.load(tiny_config(dataset="", train_file=train, validation_fraction=0.2))
    two = data.load(tiny_config(dataset="", train_file=train, validation_fraction=0.2))
    assert one.eval.texts == two.eval.texts
    assert sorted(one.eval.labels).count("b") == 10 and len(one.eval) == 40
    assert len(one.train) == 160 and not set(one.train.texts) & set(one.eval.texts)
    assert "20% of train" in one.description


def test_few_shot_keeps_k_per_class_seeded_and_reports_short_classes(tmp_path, caplog):
    rows = "".join(f"text {i}\t{'a' if i % 10 else 'b'}\n" for i in range(200))  # 180 a, 20 b
    train = write(tmp_path, "train.tsv", "sentence\tlabel\n" + rows)
    evals = write(tmp_path, "dev.tsv", "sentence\tlabel\nx\ta\ny\tb\n")

    def few(k, seed):
        return data.load(tiny_config(dataset="", train_file=train, eval_file=evals,
                                     max_train_examples_per_class=k, seed=seed))

    one, same, other = few(16, 1), few(16, 1), few(16, 2)
    assert sorted(one.train.labels) == ["a"] * 16 + ["b"] * 16
    assert one.train.texts == same.train.texts and one.train.texts != other.train.texts
    lines = one.train.lines
    assert lines == sorted(lines)  # source order kept: file lines still point at the examples
    assert all(one.train.texts[i] == f"text {lines[i] - 2}" for i in range(len(lines)))
    assert "16 per class, seed 1" in one.description
    with caplog.at_level("WARNING"):
        many = few(64, 1)
    assert sorted(many.train.labels).count("b") == 20 and len(many.train) == 84
    assert "fewer than 64 examples for label(s) {'b': 20}" in caplog.text


@pytest.mark.parametrize("name,text_key,eval_split", [("imdb_reviews", "text", "test"),
                                                      ("glue/sst2", "sentence", "validation")])
def test_tfds_datasets_load_through_tfds(name, text_key, eval_split):
    import tensorflow_datasets as tfds

    with tfds.testing.mock_data(num_examples=12):
        loaded = data.load(tiny_config(dataset=name))
    assert len(loaded.train) == 12 and len(loaded.eval) == 12
    assert loaded.eval.source == f"tfds:{name}/{eval_split}"
    assert all(isinstance(t, str) and t for t in loaded.train.texts)
    # Class names come from the TFDS ClassLabel feature.
    assert set(loaded.vocab.names) <= {"neg", "pos", "negative", "positive"}


def test_tfds_download_failure_is_a_clear_error(monkeypatch, tmp_path):
    import tensorflow_datasets as tfds

    def offline(self, *args, **kwargs):
        raise ConnectionError("Failed to resolve host")

    monkeypatch.setattr(tfds.core.DatasetBuilder, "download_and_prepare", offline)
    with pytest.raises(DataError, match=r"tfds:imdb_reviews: could not download and prepare it in .*"
                                        r"ConnectionError: Failed to resolve host.*--data_dir"):
        data.load(tiny_config(dataset="imdb_reviews", data_dir=str(tmp_path)))


def test_tfds_download_code_path_has_its_imports():
    # tensorflow-datasets imports importlib_resources on its download path without declaring it.
    import tensorflow_datasets as tfds

    assert tfds.builder("imdb_reviews").code_path.exists()


# -- files too small for the hold-out, through the path kft.train takes (trainer -> task -> data) --

def _train(tmp_path, **overrides):
    from kft.training import trainer

    return trainer.train_and_evaluate(tiny_config(dataset="", text_field="text", label_field="stars",
                                                  **overrides), str(tmp_path / "model"))


def test_a_two_row_csv_fails_with_a_message_naming_the_file_and_the_numbers(tmp_path):
    train = write(tmp_path, "t.csv", "text,stars\ngreat film,5\nawful film,1\n")
    with pytest.raises(DataError) as e:
        _train(tmp_path, train_file=train)
    assert str(e.value) == (
        f"{train}: 2 rows in 2 classes (1: 1, 5: 1); --validation_fraction=0.1 holds out no row for "
        "evaluation (a class needs at least 6 rows at this fraction). Give --eval_file, more rows, or a "
        "larger --validation_fraction")


def test_a_class_too_small_to_hold_out_is_trained_on_and_named_in_the_log(tmp_path, caplog):
    train = write(tmp_path, "t.csv", "text,stars\ngreat,5\nfine,5\nawful,1\n")
    with pytest.raises(DataError, match=r"3 rows in 2 classes \(1: 1, 5: 2\); --validation_fraction=0.1 "
                                        r"holds out no row"):
        _train(tmp_path, train_file=train)
    with caplog.at_level("WARNING"):
        loaded = data.load(tiny_config(dataset="", train_file=train, text_field="text", label_field="stars",
                                       validation_fraction=0.5))
    assert loaded.eval.labels == [5] and sorted(loaded.train.labels) == [1, 5]
    assert (f"{train}: --validation_fraction=0.5 holds out no row of 1 class(es) with too few rows (1: 1); "
            "they are trained on but not evaluated") in caplog.text


def test_a_singleton_class_run_trains_and_evaluates_without_it(tmp_path, tiny_preset):
    train = write(tmp_path, "t.csv", "text,stars\ngreat,5\nfine,5\nawful,1\n")
    result = _train(tmp_path, train_file=train, validation_fraction=0.5, backbone=tiny_preset)
    assert result["eval"]["examples"] == 1 and result["data"]["train"]["examples"] == 2


@pytest.mark.parametrize("content,message", [("", "file is empty"),
                                             ("text,stars\n", "no examples after the header")])
def test_an_empty_eval_file_is_an_error_naming_it(tmp_path, content, message):
    train = write(tmp_path, "t.csv", "text,stars\ngreat film,5\nawful film,1\n")
    evals = write(tmp_path, "dev.csv", content)
    with pytest.raises(DataError, match=f"{evals}: {message}"):
        _train(tmp_path, train_file=train, eval_file=evals)


def test_an_empty_tfds_split_is_an_error_naming_it():
    import tensorflow_datasets as tfds

    with tfds.testing.mock_data(num_examples=0):
        with pytest.raises(DataError, match=r"tfds:imdb_reviews/train: the train split has no examples"):
            data.load(tiny_config(dataset="imdb_reviews"))


# -- TFDS without network: fail at once, naming the host --

def test_an_offline_tfds_download_fails_at_once_naming_the_host(monkeypatch, tmp_path, caplog):
    import socket

    import tensorflow_datasets as tfds

    asked, downloads = [], []

    def no_dns(host, *args, **kwargs):
        asked.append(host)
        raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")

    monkeypatch.setattr(socket, "getaddrinfo", no_dns)
    monkeypatch.setattr(tfds.download.DownloadManager, "download",
                        lambda self, *a, **k: downloads.append(a))  # must never be reached
    with caplog.at_level("INFO"), pytest.raises(DataError) as e:
        data.load(tiny_config(dataset="imdb_reviews", data_dir=str(tmp_path)))
    message = str(e.value)
    assert message.startswith(f"tfds:imdb_reviews: not prepared in {tmp_path}")
    assert "ai.stanford.edu (gaierror: [Errno -2] Name or service not known)" in message
    assert "--data_dir" in message
    assert asked == ["ai.stanford.edu"] and downloads == []
    assert f"tfds:imdb_reviews: not prepared in {tmp_path}" in caplog.text
    assert "downloading it from ai.stanford.edu" in caplog.text


def test_a_resolver_that_hangs_counts_as_unresolved_after_the_timeout(monkeypatch):
    import socket
    import time

    monkeypatch.setattr(socket, "getaddrinfo", lambda *a, **k: time.sleep(3))
    assert data.unresolved_hosts(["ai.stanford.edu"], timeout=0.2) == {
        "ai.stanford.edu": "no answer within 0.2 s"}


def test_a_one_sentence_token_file_without_eval_data_is_an_error_naming_it(tmp_path):
    from kft.training import trainer

    train = write(tmp_path, "train.txt", "EU B-ORG\nrejects O\n")
    message = rf"{train}: 1 sentence\(s\); --validation_fraction=0.1 needs at least 2"
    with pytest.raises(DataError, match=message):
        trainer.train_and_evaluate(tiny_config(dataset="", task="token_classification", train_file=train),
                                   str(tmp_path / "model"))
