"""Reading and validating labelled text: every bad input names file, line and field."""

import json

import numpy as np
import pytest

from conftest import tiny_config
from kft import data
from kft.data import DataError


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
