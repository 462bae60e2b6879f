"""Compression: quantized exports, distillation, students, pruning."""

import json

import numpy as np
import pytest

from conftest import run_python, tiny_config
from kft import trainer

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
    from kft import backbones, inputs

    loaded = backbones.load(tiny_preset)
    enc = inputs.encode(loaded.tokenizer, loaded.packing, texts, 64)
    ids = enc.ids.to_tensor(default_value=loaded.packing.pad).numpy()
    mask = (np.arange(ids.shape[1])[None, :] < enc.lengths[:, None]).astype(np.int32)
    in_memory = fitted.model({"token_ids": ids, "padding_mask": mask}, training=False).numpy()
    np.testing.assert_allclose(served, in_memory, atol=1e-5)
    meta = json.loads(open(f"{info['export']}/assets.extra/metadata.json").read())
    assert meta["quantization"] == mode


def test_quantize_is_refused_for_the_decoder_task():
    from kft.config import FlagError, check_task_flags

    with pytest.raises(FlagError, match="--quantize=int8 applies to"):
        check_task_flags(tiny_config(task="causal_lm", quantize="int8"))
