"""The exported SavedModel serves the same probabilities in a fresh process."""

import json

import numpy as np
import pytest
import tensorflow as tf

from conftest import run_python
from kft.models import backbones
from kft.models import savedmodel as export
from kft.data import inputs
from kft.tasks import classification

TEXTS = ["a gorgeous, witty, seductive movie.", "the plot is nothing but boilerplate clichés",
         "fine", "a lovely film with a big heart and a " + "very " * 40 + "long tail"]

CHECK = r"""
import json, sys
sys.modules["keras_hub"] = None  # serving needs tensorflow + tensorflow_text only (README)
import numpy as np
import tensorflow as tf
import tensorflow_text  # registers the tokenizer ops the serving graph uses
path, texts_json, ids_npz, out = sys.argv[1:]
model = tf.saved_model.load(path)
texts = json.load(open(texts_json))
by_text = model.signatures["serving_default"](text=tf.constant(texts))
z = np.load(ids_npz)
by_ids = model.signatures["serve_token_ids"](token_ids=tf.constant(z["ids"]),
                                             padding_mask=tf.constant(z["mask"]))
np.savez(out, text_probs=by_text["probabilities"].numpy(), ids_probs=by_ids["probabilities"].numpy(),
         labels=by_text["label"].numpy().astype("S"), class_id=by_text["class_id"].numpy())
"""


@pytest.fixture(scope="module")
def exported(tiny_classifier_export):
    # tests/conftest.py's untrained classifier exported with 32 positions (shared with test_predict_lm.py)
    path, model, loaded, out = tiny_classifier_export
    seq_len = 32
    enc = inputs.encode(loaded.tokenizer, loaded.packing, TEXTS, seq_len)
    ids = enc.ids.to_tensor(default_value=loaded.packing.pad).numpy()
    mask = (np.arange(ids.shape[1])[None, :] < enc.lengths[:, None]).astype(np.int32)
    expected = model({"token_ids": ids, "padding_mask": mask}, training=False).numpy()
    return path, ids, mask, expected, out


@pytest.mark.slow
def test_export_round_trips_in_a_fresh_process(exported):
    path, ids, mask, expected, out = exported
    texts_json, ids_npz, result = out / "texts.json", out / "ids.npz", out / "result.npz"
    texts_json.write_text(json.dumps(TEXTS))
    np.savez(ids_npz, ids=ids, mask=mask)
    proc = run_python(["-c", CHECK, path, str(texts_json), str(ids_npz), str(result)])
    assert proc.returncode == 0, proc.stderr[-3000:]
    got = np.load(result)
    assert np.abs(got["text_probs"] - expected).max() <= 1e-5
    assert np.abs(got["ids_probs"] - expected).max() <= 1e-5
    names = np.array([b"negative", b"positive"])
    np.testing.assert_array_equal(got["labels"], names[expected.argmax(-1)])
    np.testing.assert_array_equal(got["class_id"], expected.argmax(-1))


@pytest.mark.slow
def test_saved_model_lists_both_signatures(exported):
    path = exported[0]
    proc = run_python(["-c", "import sys, tensorflow as tf, tensorflow_text; "
                       "m = tf.saved_model.load(sys.argv[1]); print(sorted(m.signatures))", path])
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "['serve_token_ids', 'serving_default']" in proc.stdout


@pytest.mark.slow
def test_predict_cli_prints_json_lines(exported, tmp_path):
    path = exported[0]
    proc = run_python(["-m", "kft.predict", f"--model={path}", TEXTS[0], TEXTS[1]])
    assert proc.returncode == 0, proc.stderr[-2000:]
    lines = [json.loads(line) for line in proc.stdout.splitlines()]
    assert [d["text"] for d in lines] == TEXTS[:2]
    for d in lines:
        assert d["label"] in ("negative", "positive")
        assert sum(d["probabilities"].values()) == pytest.approx(1, abs=1e-5)
    listing = tmp_path / "texts.txt"
    listing.write_text("\n".join(TEXTS) + "\n")
    proc = run_python(["-m", "kft.predict", f"--model={path}", f"--input_file={listing}"])
    assert proc.returncode == 0 and len(proc.stdout.splitlines()) == len(TEXTS)


@pytest.mark.slow
def test_predict_cli_reports_a_wrong_model_path(tmp_path):
    proc = run_python(["-m", "kft.predict", f"--model={tmp_path}", "text"])
    assert proc.returncode == 2 and "no saved_model.pb" in proc.stderr


ROBUST = r"""
import json, sys
import numpy as np
import tensorflow as tf
import tensorflow_text  # noqa: F401
model = tf.saved_model.load(sys.argv[1])
serve = model.signatures["serving_default"]
report = {}
one = serve(text=tf.constant(["fine"]))
report["one"] = list(one["probabilities"].shape)
many = serve(text=tf.constant(["a lovely film", "bad", "fine"] * 170 + ["ok", "good"]))
report["many"] = list(many["probabilities"].shape)
empty = serve(text=tf.constant([], tf.string))
report["empty"] = {k: list(v.shape) for k, v in empty.items()}
huge = "a lovely film " * 7200  # about 100,000 characters
report["huge_chars"] = len(huge)
out = serve(text=tf.constant([huge, "bad"]))
report["huge"] = [float(x) for x in out["probabilities"].numpy().sum(-1)]
report["huge_label"] = out["label"].numpy()[0].decode()
for name, call in [("wrong_dtype", lambda: serve(text=tf.constant([1, 2]))),
                   ("missing_input", lambda: serve())]:
    try:
        call()
        report[name] = "accepted"
    except (TypeError, ValueError, tf.errors.InvalidArgumentError) as e:
        report[name] = type(e).__name__ + ": " + str(e).splitlines()[0][:200]
report["error_lines"] = [report["wrong_dtype"], report["missing_input"]]
report["still_serving"] = serve(text=tf.constant(["fine"]))["label"].numpy()[0].decode()
print(json.dumps(report))
"""


@pytest.mark.slow
def test_serving_handles_batch_sizes_huge_texts_and_bad_requests_in_a_fresh_process(exported):
    proc = run_python(["-c", ROBUST, exported[0]])
    assert proc.returncode == 0, proc.stderr[-3000:]
    r = json.loads(proc.stdout.strip().splitlines()[-1])
    assert r["one"] == [1, 2] and r["many"] == [512, 2]
    assert r["empty"] == {"probabilities": [0, 2], "class_id": [0], "label": [0], "truncated": [0]}
    assert r["huge_chars"] >= 100_000
    assert r["huge"] == pytest.approx([1.0, 1.0], abs=1e-5)  # truncated to sequence_length, classified
    assert r["huge_label"] in ("negative", "positive")
    for bad in ("wrong_dtype", "missing_input"):
        assert r[bad] != "accepted", bad
    assert "string" in r["wrong_dtype"].lower() or "dtype" in r["wrong_dtype"].lower()
    assert "text" in r["missing_input"]
    assert r["still_serving"] in ("negative", "positive")  # the process survived every bad request


def test_served_texts_are_read_past_the_training_cap_and_what_is_cut_is_counted(tiny_preset, tmp_path):
    """A text longer than the training cap (8 tokens) is served whole up to the serving cap (40):
    its probabilities are the model's on every token, not on the training cap's first 8."""
    import keras

    loaded = backbones.load(tiny_preset)
    keras.utils.set_random_seed(7)
    model = classification.build_model(loaded.backbone, 2, 0.1, pooling="mean")
    head = model.get_layer("classifier")
    head.kernel.assign(head.kernel * 10.0)  # a random tiny model barely reacts to anything: amplify
    path = export.export(model, loaded.tokenizer, loaded.packing, 8, classification, ["neg", "pos"],
                         str(tmp_path), "long", {}, serving_length=40)
    text = " ".join(["a lovely film with a big heart"] * 4) + " but the end is dull"  # 33 pieces
    longer = " ".join(["a lovely film with a big heart"] * 9)  # 63 pieces
    pieces = [len(p) for p in loaded.tokenizer([text, longer])]
    assert pieces[0] + 2 <= 40 < pieces[1] + 2

    def probabilities(cap):
        enc = inputs.encode(loaded.tokenizer, loaded.packing, [text], cap)
        ids = enc.ids.to_tensor().numpy()
        return model({"token_ids": ids, "padding_mask": np.ones_like(ids)}, training=False).numpy()[0]

    whole, cut = np.log(probabilities(40)), np.log(probabilities(8))
    assert np.abs(whole - cut).max() > 0.05  # the end of the text changes the tiny model's output
    served = export.load(path).signatures["serving_default"](text=tf.constant([text, longer, "fine"]))
    np.testing.assert_allclose(np.log(served["probabilities"].numpy()[0]), whole, atol=1e-4)
    np.testing.assert_array_equal(served["truncated"].numpy(), [0, pieces[1] + 2 - 40, 0])
    meta = json.loads((tmp_path / "long" / "1" / "assets.extra" / "metadata.json").read_text())
    assert (meta["sequence_length"], meta["serving_sequence_length"]) == (8, 40)


@pytest.mark.slow
def test_the_demo_export_stores_each_weight_once(tmp_path):
    """keras' ExportArchive.track() wrote every variable twice (variables/ was 2x the weights)."""
    loaded = backbones.load(backbones.bundled_folder())
    model = classification.build_model(loaded.backbone, 2, 0.1)
    path = export.export(model, loaded.tokenizer, loaded.packing, 64, classification, ["neg", "pos"],
                         str(tmp_path), "demo", {})
    params = model.count_params()
    stored = export.variables_bytes(path)
    assert params > 20_000_000
    assert abs(stored - 4 * params) <= 0.05 * 4 * params, (stored, 4 * params)
