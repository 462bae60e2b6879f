"""A tiny random BART written the way Hugging Face ships one: config.json for BartModel,
model.safetensors under the tensor names keras-hub's convert_bart.py reads, and vocab.json +
merges.txt from the byte-level BPE vocabulary of tests/decoder_fixtures.py (with BART's special
tokens)."""

from __future__ import annotations

import json
import os

import numpy as np

import decoder_fixtures as fx

BART = dict(hidden=32, layers=2, heads=4, intermediate=64, positions=128)
SPECIAL = ["<s>", "<pad>", "</s>", "<unk>"]


def bart_vocabulary() -> tuple[list[str], list[str]]:
    tokens, merges = fx.bpe_vocabulary()
    return SPECIAL + [t for t in tokens if t not in fx.SPECIAL] + ["<mask>"], merges


def bart_weights(vocab: int, hidden: int, layers: int, intermediate: int, positions: int,
                 seed: int = 0, **_) -> dict[str, np.ndarray]:
    """Random BART weights under Hugging Face names ([out, in] kernels; positions have 2 extra rows)."""
    rng = np.random.default_rng(seed)

    def w(*shape):
        return (rng.standard_normal(shape) * 0.05).astype(np.float32)

    def norm(name):
        return {f"{name}.weight": (1 + 0.1 * rng.standard_normal(hidden)).astype(np.float32),
                f"{name}.bias": w(hidden)}

    def linear(name, out, into):
        return {f"{name}.weight": w(out, into), f"{name}.bias": w(out)}

    def attention(name):
        t = {}
        for p in ("q_proj", "k_proj", "v_proj", "out_proj"):
            t.update(linear(f"{name}.{p}", hidden, hidden))
        return t

    t = {"shared.weight": w(vocab, hidden)}
    for side in ("encoder", "decoder"):
        t[f"{side}.embed_positions.weight"] = w(positions + 2, hidden)
        t.update(norm(f"{side}.layernorm_embedding"))
        for i in range(layers):
            p = f"{side}.layers.{i}"
            t.update(attention(f"{p}.self_attn"))
            t.update(norm(f"{p}.self_attn_layer_norm"))
            t.update(linear(f"{p}.fc1", intermediate, hidden))
            t.update(linear(f"{p}.fc2", hidden, intermediate))
            t.update(norm(f"{p}.final_layer_norm"))
            if side == "decoder":
                t.update(attention(f"{p}.encoder_attn"))
                t.update(norm(f"{p}.encoder_attn_layer_norm"))
    return t


def write_bart_folder(folder: str, seed: int = 0) -> str:
    """A Hugging Face BART folder (config.json, model.safetensors, vocab.json, merges.txt)."""
    from safetensors.numpy import save_file

    tokens, merges = bart_vocabulary()
    os.makedirs(folder, exist_ok=True)
    save_file(bart_weights(len(tokens), seed=seed, **BART), os.path.join(folder, "model.safetensors"),
              metadata={"format": "pt"})
    config = {"architectures": ["BartModel"], "model_type": "bart", "vocab_size": len(tokens),
              "d_model": BART["hidden"], "num_hidden_layers": BART["layers"],
              "encoder_layers": BART["layers"], "decoder_layers": BART["layers"],
              "encoder_attention_heads": BART["heads"], "decoder_attention_heads": BART["heads"],
              "encoder_ffn_dim": BART["intermediate"], "decoder_ffn_dim": BART["intermediate"],
              "max_position_embeddings": BART["positions"], "dropout": 0.0, "attention_dropout": 0.0,
              "activation_function": "gelu", "scale_embedding": False, "bos_token_id": 0, "pad_token_id": 1,
              "eos_token_id": 2, "decoder_start_token_id": 2, "forced_bos_token_id": 0}
    return fx.write_config_and_bpe(folder, config, tokens, merges)
