"""The CRF's forward algorithm and Viterbi decoding against brute force over every tag path."""

import itertools

import numpy as np
import pytest

from kft.tasks.token_classification import crf

TAGS = ["O", "B-PER", "I-PER", "B-LOC", "I-LOC"]


def _layer(num_tags, seed, **kwargs):
    rng = np.random.default_rng(seed)
    layer = crf.CRF(num_tags, **kwargs)
    layer.transitions.assign(rng.normal(size=(num_tags, num_tags)).astype("float32"))
    layer.start.assign(rng.normal(size=num_tags).astype("float32"))
    layer.end.assign(rng.normal(size=num_tags).astype("float32"))
    return layer


def _score(layer, emissions, path, penalty=None, start_penalty=None):
    trans = layer.transitions.numpy() + (0 if penalty is None else penalty)
    start = layer.start.numpy() + (0 if start_penalty is None else start_penalty)
    s = start[path[0]] + emissions[0, path[0]] + layer.end.numpy()[path[-1]]
    for t in range(1, len(path)):
        s += trans[path[t - 1], path[t]] + emissions[t, path[t]]
    return s


@pytest.mark.parametrize("num_tags,lengths", [(3, [4, 2, 1]), (4, [3, 3]), (2, [1])])
def test_log_partition_and_path_score_equal_brute_force(num_tags, lengths):
    layer = _layer(num_tags, seed=num_tags)
    rng = np.random.default_rng(1)
    time = max(lengths)
    emissions = rng.normal(size=(len(lengths), time, num_tags)).astype("float32")
    mask = (np.arange(time)[None] < np.array(lengths)[:, None]).astype("int32")
    tags = rng.integers(0, num_tags, (len(lengths), time)).astype("int32")
    log_z = np.asarray(layer.log_partition(emissions, mask))
    gold = np.asarray(layer.path_score(emissions, tags, mask))
    for b, n in enumerate(lengths):
        scores = [_score(layer, emissions[b], p) for p in itertools.product(range(num_tags), repeat=n)]
        assert log_z[b] == pytest.approx(np.logaddexp.reduce(scores), abs=1e-4)
        assert gold[b] == pytest.approx(_score(layer, emissions[b], tags[b, :n]), abs=1e-4)
    nll = np.asarray(layer.negative_log_likelihood(emissions, tags, mask))
    assert np.all(nll > 0)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_viterbi_equals_the_brute_force_best_path(seed):
    num_tags, lengths = 4, [5, 3, 1]
    layer = _layer(num_tags, seed)
    rng = np.random.default_rng(seed + 10)
    emissions = rng.normal(size=(3, 5, num_tags)).astype("float32")
    mask = (np.arange(5)[None] < np.array(lengths)[:, None]).astype("int32")
    tags, best = layer.decode(emissions, mask)
    tags, best = np.asarray(tags), np.asarray(best)
    for b, n in enumerate(lengths):
        paths = list(itertools.product(range(num_tags), repeat=n))
        scores = [_score(layer, emissions[b], p) for p in paths]
        assert tuple(tags[b, :n]) == paths[int(np.argmax(scores))]
        assert best[b] == pytest.approx(max(scores), abs=1e-4)
        assert not tags[b, n:].any()  # padding positions hold 0


def test_constrained_decoding_never_emits_a_forbidden_transition():
    allowed, allowed_start = crf.iob2_constraints(TAGS)
    assert not allowed[0, 2] and not allowed[1, 4] and allowed[1, 2] and allowed[2, 2]
    assert not allowed_start[2] and allowed_start[1]
    layer = _layer(len(TAGS), 5, allowed=allowed, allowed_start=allowed_start)
    rng = np.random.default_rng(0)
    emissions = rng.normal(size=(64, 7, len(TAGS))).astype("float32")
    emissions[..., 2] += 3.0  # I-PER scores high everywhere, also where it may not follow
    emissions[..., 4] += 3.0
    mask = np.ones((64, 7), "int32")
    tags = np.asarray(layer.decode(emissions, mask)[0])
    for path in tags:
        assert TAGS[path[0]][:2] != "I-"
        for a, b in zip(path[:-1], path[1:]):
            assert allowed[a, b], (TAGS[a], TAGS[b])
    # The same layer without constraints would emit them: the test can fail.
    free = _layer(len(TAGS), 5)
    free_tags = np.asarray(free.decode(emissions, mask)[0])
    assert any(not allowed[a, b] for p in free_tags for a, b in zip(p[:-1], p[1:]))


def test_decoding_inside_a_graph_handles_one_word_batches():
    import tensorflow as tf

    layer = _layer(4, 3)
    decode = tf.function(lambda e, m: layer.decode(e, m), input_signature=[
        tf.TensorSpec([None, None, 4], tf.float32), tf.TensorSpec([None, None], tf.int32)])
    emissions = np.random.default_rng(0).normal(size=(2, 1, 4)).astype("float32")
    tags, best = decode(emissions, np.ones((2, 1), "int32"))
    for b in range(2):
        scores = [_score(layer, emissions[b], (k,)) for k in range(4)]
        assert tags.numpy()[b].tolist() == [int(np.argmax(scores))]
        assert best.numpy()[b] == pytest.approx(max(scores), abs=1e-4)
    log_z = tf.function(lambda e, m: layer.log_partition(e, m), input_signature=[
        tf.TensorSpec([None, None, 4], tf.float32), tf.TensorSpec([None, None], tf.int32)])
    assert log_z(emissions, np.ones((2, 1), "int32")).numpy()[0] == pytest.approx(
        np.logaddexp.reduce([_score(layer, emissions[0], (k,)) for k in range(4)]), abs=1e-4)
