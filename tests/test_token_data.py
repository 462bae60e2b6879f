"""Reading word-tagged sentences: CoNLL and JSONL, tag vocabulary, validation that names file and line."""

import json
import os

import pytest

from conftest import SHARED_DATA
from kft.tasks.token_classification import data as token_data
from kft.data.sources import DataError

CONLL = """-DOCSTART- -X- O O

EU NNP B-NP B-ORG
rejects VBZ B-VP O
German JJ B-NP B-MISC

Peter NNP B-NP B-PER
Blackburn NNP I-NP I-PER
"""


def write(tmp_path, name, text):
    path = tmp_path / name
    path.write_text(text)
    return str(path)


def test_conll_sentences_tags_and_lines(tmp_path):
    split = token_data.read_conll(write(tmp_path, "train.txt", CONLL), "train")
    assert split.words == [["EU", "rejects", "German"], ["Peter", "Blackburn"]]
    assert split.tags == [["B-ORG", "O", "B-MISC"], ["B-PER", "I-PER"]]
    assert split.lines == [3, 7] and split.where(1, 1).endswith("train.txt:8")
    chunks = token_data.read_conll(str(tmp_path / "train.txt"), "train", tag_column=2)
    assert chunks.tags[1] == ["B-NP", "I-NP"]
    vocab = token_data.TagVocab.from_sentences(split)
    assert vocab.names == ["O", "B-MISC", "B-ORG", "B-PER", "I-PER"]
    assert vocab.encode(split)[1] == [3, 4]


def test_jsonl_sentences(tmp_path):
    rows = [{"tokens": ["Paris", "is", "nice"], "tags": ["B-LOC", "O", "O"]}, {"tokens": [], "tags": []}]
    split = token_data.read_file(write(tmp_path, "t.jsonl", "\n".join(map(json.dumps, rows))), "train")
    assert split.words == [["Paris", "is", "nice"]] and split.where(0, 2).endswith("t.jsonl:1")


@pytest.mark.parametrize("name,text,message", [
    ("a.txt", "EU B-ORG\nrejects\n", r"a.txt:2: field 'tag' \(column -1\): the line has 1 column"),
    ("b.txt", "EU\tB-ORG\n\tO\n", r"b.txt:2: field 'token': empty token"),
    ("c.jsonl", '{"tokens": ["a", "b"], "tags": ["O"]}\n', r"c.jsonl:1: field 'tags': 1 tags for 2 tokens"),
    ("d.jsonl", '{"tokens": ["a", " "], "tags": ["O", "O"]}\n',
     r"d.jsonl:1: field 'tokens': token 1 is empty"),
    ("e.jsonl", '{"words": ["a"]}\n', r"e.jsonl:1: field 'tokens': missing or not a list"),
    ("f.txt", "-DOCSTART- O\n\n", r"f.txt: no sentences"),
])
def test_bad_files_name_file_line_and_field(tmp_path, name, text, message):
    with pytest.raises(DataError, match=message):
        token_data.read_file(write(tmp_path, name, text), "train")


def test_a_tag_unseen_in_train_names_its_line(tmp_path):
    train = token_data.read_conll(write(tmp_path, "t.txt", CONLL), "train")
    vocab = token_data.TagVocab.from_sentences(train)
    dev = token_data.read_conll(write(tmp_path, "dev.txt", "Rome B-LOC\nfell O\n"), "eval")
    with pytest.raises(DataError, match=r"dev.txt:1: field 'tag': 'B-LOC' does not occur in the training"):
        vocab.encode(dev)


def test_ill_formed_iob2_is_counted_and_reported_not_fixed(tmp_path):
    split = token_data.read_conll(write(tmp_path, "t.txt", "a O\nb I-PER\nc I-PER\n\nd B-LOC\ne I-ORG\n"),
                                  "train")
    report = token_data.iob2_violations(split)
    assert report["count"] == 2
    assert report["examples"] == [f"{tmp_path}/t.txt:2: O -> I-PER", f"{tmp_path}/t.txt:6: B-LOC -> I-ORG"]
    assert split.tags[0] == ["O", "I-PER", "I-PER"]  # left as written


@pytest.mark.skipif(not os.path.isdir(os.path.join(SHARED_DATA, "conll2003")),
                    reason="../shared/data/conll2003 is not present")
def test_conll2003_files_read_with_nine_tags():
    train = token_data.read_conll(os.path.join(SHARED_DATA, "conll2003", "train.txt"), "train")
    valid = token_data.read_conll(os.path.join(SHARED_DATA, "conll2003", "valid.txt"), "eval")
    vocab = token_data.TagVocab.from_sentences(train)
    assert len(vocab.names) == 9 and vocab.names[0] == "O"
    assert len(vocab.encode(valid)) == len(valid)
    assert len(train) > 10000 and all(len(w) == len(t) for w, t in zip(train.words, train.tags))


def test_tfds_conll2003_reads_through_tfds():
    import tensorflow as tf
    import tensorflow_datasets as tfds

    sentences = [(["EU", "rejects", "German", "call"], [3, 0, 7, 0]), (["Peter", "Blackburn"], [1, 2])]

    def as_dataset(self, split, **kwargs):  # conll2003's features, two fixed sentences
        def rows():
            for words, ner in sentences:
                yield {"tokens": words, "ner": ner}
        return tf.data.Dataset.from_generator(rows, output_signature={
            "tokens": tf.TensorSpec([None], tf.string), "ner": tf.TensorSpec([None], tf.int64)})

    with tfds.testing.mock_data(as_dataset_fn=as_dataset):
        split = token_data.read_tfds("conll2003", "dev", "")
    assert split.source == "tfds:conll2003/dev" and split.words[1] == ["Peter", "Blackburn"]
    names = tfds.builder("conll2003").info.features["ner"].feature.names
    assert split.tags == [[names[i] for i in ner] for _, ner in sentences]
    with tfds.testing.mock_data(num_examples=6):  # random lengths: tokens and tags disagree
        with pytest.raises(DataError, match=r"tfds:conll2003/dev \(sentence \d+\): field 'ner'"):
            token_data.read_tfds("conll2003", "dev", "")
