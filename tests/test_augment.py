"""EDA augmentation: seeded, counted, train-only, and tag-preserving for token classification."""

import collections

import numpy as np
import pytest

from conftest import run_python, tiny_config
from kft.data import augment
from kft.data import sources as data_lib
from kft.training import trainer
from kft.config import FlagError
from kft.tasks.token_classification import task as token_task

SYNONYMS = {"good": ["fine", "decent"], "film": ["movie", "motion picture"], "saw": ["watched"],
            "city": ["town"], "great": ["excellent", "superb"], "boring": ["dull", "tedious"]}


def _entities(words, tags):
    """(type, words) of every IOB2 entity, in order."""
    out, current = [], None
    for w, t in zip(words, tags):
        if t.startswith("B-") or (t.startswith("I-") and (current is None or current[0] != t[2:])):
            current = (t[2:], [w])
            out.append(current)
        elif t.startswith("I-"):
            current[1].append(w)
        else:
            current = None
    return [(kind, tuple(ws)) for kind, ws in out]


def test_the_shipped_synonym_table_loads_and_never_lists_a_word_as_its_own_synonym():
    table = augment.load_synonyms()
    assert len(table) >= 300
    assert all(word not in synonyms and synonyms for word, synonyms in table.items())
    assert not set(table) & augment.STOPWORDS


def test_a_malformed_synonym_table_is_refused_with_its_file_and_line(tmp_path):
    path = tmp_path / "syn.tsv"
    path.write_text("# comment\ngood\tfine\nbad fine\n")
    with pytest.raises(augment.SynonymError, match=f"{path}:3"):
        augment.load_synonyms(str(path))


def test_copies_are_the_same_for_a_seed_and_differ_for_another():
    words = "I saw a good film in the city and it was great , not boring .".split()
    a = augment.Augmenter(0.2, 7, SYNONYMS)
    first = [a.copy(words, None, 5, c) for c in range(8)]
    assert first == [augment.Augmenter(0.2, 7, SYNONYMS).copy(words, None, 5, c) for c in range(8)]
    assert first != [augment.Augmenter(0.2, 8, SYNONYMS).copy(words, None, 5, c) for c in range(8)]
    assert all(op is not None and new != words for op, new, _ in first)
    # the copy of example 5 does not depend on which examples were augmented before it
    assert augment.Augmenter(0.2, 7, SYNONYMS).copy(words, None, 5, 3) == first[3]


def test_each_operation_changes_what_it_says():
    a = augment.Augmenter(0.25, 0, SYNONYMS)
    words = "The Good film was boring".split()
    rng = np.random.default_rng(0)
    replaced, _ = a._synonym(list(words), None, rng)
    assert replaced != words and len(replaced) >= len(words)
    assert any(w in ("Fine", "Decent", "movie", "motion", "dull", "tedious") for w in replaced)
    assert "The" in replaced and "was" in replaced  # stopwords stay
    inserted, _ = a._insert(list(words), None, rng)
    assert len(inserted) > len(words) and collections.Counter(words) - collections.Counter(inserted) == {}
    swapped, _ = a._swap(list(words), None, rng)
    assert sorted(swapped) == sorted(words)
    deleted, _ = augment.Augmenter(0.5, 1, SYNONYMS)._delete(list(words), None, np.random.default_rng(1))
    assert 1 <= len(deleted) < len(words) and all(w in words for w in deleted)


def test_a_copy_no_operation_can_change_is_counted_and_not_added():
    a = augment.Augmenter(0.1, 0, SYNONYMS)
    assert a.copy(["Yes"], None, 0, 0) == (None, ["Yes"], None)


def test_tagged_copies_keep_every_entity_its_words_and_valid_iob2_tags():
    sentences = [("John Smith saw a good film in New York City last week".split(),
                  "B-PER I-PER O O O O O B-LOC I-LOC I-LOC O O".split()),
                 ("The great city of Paris was boring".split(), "O O O O B-LOC O O".split()),
                 ("EU rejects German call".split(), "B-ORG O B-MISC O".split())]
    a = augment.Augmenter(0.3, 11, SYNONYMS)
    seen = collections.Counter()
    for i, (words, tags) in enumerate(sentences):
        for c in range(20):
            op, new_words, new_tags = a.copy(words, tags, i, c)
            seen[op] += 1
            assert len(new_words) == len(new_tags)
            assert _entities(new_words, new_tags) == _entities(words, tags), (op, new_words, new_tags)
            for prev, tag in zip(["O"] + new_tags, new_tags):  # IOB2: I-X follows B-X or I-X
                assert not tag.startswith("I-") or prev[2:] == tag[2:]
    assert set(seen) >= set(augment.OPERATIONS)


def _write_tsv(path, rows):
    path.write_text("sentence\tlabel\n" + "".join(f"{t}\t{y}\n" for t, y in rows))
    return str(path)


def test_classification_copies_reach_train_only_and_are_reported(tmp_path):
    train_rows = [(f"a good film number {i} , great fun", i % 2) for i in range(30)]
    eval_rows = [("a good film , not boring", 1), ("a boring film", 0)]
    config = tiny_config(dataset="", train_file=_write_tsv(tmp_path / "train.tsv", train_rows),
                         eval_file=_write_tsv(tmp_path / "eval.tsv", eval_rows), augment="eda",
                         augment_copies=3, augment_rate=0.2)
    data = data_lib.load(config)
    assert data.eval.texts == [t for t, _ in eval_rows]
    report = data.augmentation
    assert report["originals"] == 30 and report["added"] + report["unchanged"] == 90
    assert len(data.train) == 30 + report["added"]
    assert data.train.texts[:30] == [t for t, _ in train_rows]
    assert sum(report["operations"].values()) == report["added"]
    again = data_lib.load(config)
    assert again.train.texts == data.train.texts and again.train.labels == data.train.labels
    # a copy keeps its source's label and line
    plain = [t for t, _ in train_rows]
    for text, label, line in zip(data.train.texts[30:], data.train.labels[30:], data.train.lines[30:]):
        assert str(label) == str(train_rows[line - 2][1])
        assert text not in plain


def test_the_held_out_eval_split_is_the_same_with_and_without_augmentation(tmp_path):
    rows = [(f"the film {i} was good", i % 2) for i in range(40)]
    path = _write_tsv(tmp_path / "train.tsv", rows)
    plain = data_lib.load(tiny_config(dataset="", train_file=path))
    augmented = data_lib.load(tiny_config(dataset="", train_file=path, augment="eda", augment_copies=2))
    assert augmented.eval.texts == plain.eval.texts
    assert not set(augmented.train.texts) & set(plain.eval.texts)


def test_token_classification_augments_train_sentences_only(tmp_path):
    conll = "\n\n".join("\n".join(f"{w} {t}" for w, t in zip(words.split(), tags.split())) for words, tags in [
        ("John saw a good film in Paris", "B-PER O O O O O B-LOC"),
        ("The city was great", "O O O O"),
        ("Mary Smith saw a boring film", "B-PER I-PER O O O O")] * 4) + "\n"
    (tmp_path / "train.txt").write_text(conll)
    (tmp_path / "eval.txt").write_text("Paris B-LOC\nwas O\ngood O\n")
    config = tiny_config(dataset="", task="token_classification", train_file=str(tmp_path / "train.txt"),
                         eval_file=str(tmp_path / "eval.txt"), augment="eda", augment_copies=2)
    data = token_task.load_data(config)
    assert data.eval.words == [["Paris", "was", "good"]]
    assert len(data.train) == 12 + data.augmentation["added"] and data.augmentation["added"] > 0
    for words, tags in zip(data.train.words[12:], data.train.tags[12:]):
        assert len(words) == len(tags)


def test_augment_flags_without_augment_or_for_another_task_are_refused(tmp_path):
    with pytest.raises(FlagError, match="--augment_copies applies with --augment=eda"):
        data_lib.load(tiny_config(augment_copies=8))
    with pytest.raises(FlagError, match="--augment_rate=0.9"):
        data_lib.load(tiny_config(augment="eda", augment_rate=0.9))
    bad = tmp_path / "syn.tsv"
    bad.write_text("good fine\n")
    with pytest.raises(FlagError, match=f"{bad}:1"):
        data_lib.load(tiny_config(augment="eda", augment_synonyms=str(bad)))
    from kft import config as config_lib

    with pytest.raises(FlagError, match="--augment=eda applies to --task=classification"):
        config_lib.check_task_flags(tiny_config(task="causal_lm", augment="eda"))


def test_a_run_with_augmentation_trains_on_the_copies_and_says_so_in_metrics(tiny_preset, tmp_path):
    metrics = trainer.fit_model(tiny_config(backbone=tiny_preset, augment="eda", augment_copies=2, drift=False),
                                str(tmp_path / "run")).metrics
    report = metrics["data"]["augmentation"]
    assert report["originals"] > 0 and report["added"] > 0
    assert metrics["data"]["train"]["examples"] == report["originals"] + report["added"]
    assert metrics["data"]["eval"]["examples"] == len(data_lib.load(tiny_config()).eval)


@pytest.mark.slow
def test_the_command_line_refuses_augmentation_flags_for_question_answering(tmp_path):
    result = run_python(["-m", "kft.train", "--task=question_answering", "--augment=eda",
                         f"--model_dir={tmp_path}"])
    assert result.returncode == 2
    assert "--augment=eda applies to --task=classification or --task=token_classification" in result.stderr


def test_repeat_adds_unchanged_copies_with_the_same_count_as_eda(tmp_path):
    rows = [(f"a good film number {i}", i % 2) for i in range(10)]
    path = _write_tsv(tmp_path / "train.tsv", rows)
    data = data_lib.load(tiny_config(dataset="", train_file=path, eval_file=path, augment="repeat",
                                     augment_copies=3))
    assert data.train.texts == [t for t, _ in rows] + [t for t, _ in rows for _ in range(3)]
    assert data.augmentation["added"] == 30 and data.augmentation["operations"] == {"repeat": 30}
    with pytest.raises(FlagError, match="--augment=repeat copies examples unchanged"):
        data_lib.load(tiny_config(dataset="", train_file=path, eval_file=path, augment="repeat",
                                  augment_rate=0.2))
