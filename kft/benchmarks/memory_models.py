"""What the memory benchmark (kft/benchmarks/memory.py) measures: llama shapes (SmolLM2's published
sizes and the Llama-3-8B shape it projects to), the combinations of frozen-base storage, attention
kernel and gradient checkpointing, and random-weight Hugging Face folders of those shapes."""

from __future__ import annotations

import dataclasses
import json
import math
import os
import shutil

import numpy as np

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.json",
                   "merges.txt")


@dataclasses.dataclass(frozen=True)
class LlamaShape:
    """The sizes of a llama-family decoder that its memory depends on."""

    hidden: int
    layers: int
    heads: int
    kv_heads: int
    intermediate: int
    vocab: int = 49152
    tied: bool = True

    @property
    def head_dim(self) -> int:
        return self.hidden // self.heads

    def projection_shapes(self) -> list[tuple[str, int, int]]:
        """(Hugging Face name, inputs, outputs) of one block's seven projections."""
        h, kv = self.hidden, self.kv_heads * self.head_dim
        return [("self_attn.q_proj", h, self.heads * self.head_dim), ("self_attn.k_proj", h, kv),
                ("self_attn.v_proj", h, kv), ("self_attn.o_proj", self.heads * self.head_dim, h),
                ("mlp.gate_proj", h, self.intermediate), ("mlp.up_proj", h, self.intermediate),
                ("mlp.down_proj", self.intermediate, h)]

    def parameters(self) -> dict:
        """Parameter counts: block projections, embedding (and untied output) matrices, norms."""
        projections = self.layers * sum(i * o for _, i, o in self.projection_shapes())
        embedding = self.vocab * self.hidden * (1 if self.tied else 2)
        norms = (2 * self.layers + 1) * self.hidden
        return {"projection": projections, "embedding": embedding, "norm": norms,
                "total": projections + embedding + norms}

    def lora_parameters(self, rank: int) -> int:
        return self.layers * sum(rank * (i + o) for _, i, o in self.projection_shapes())


# SmolLM2's published configurations, and the shape the memory is projected to (Llama-3-8B).
SIZES = {
    "135m": LlamaShape(hidden=576, layers=30, heads=9, kv_heads=3, intermediate=1536),
    "360m": LlamaShape(hidden=960, layers=32, heads=15, kv_heads=5, intermediate=2560),
    "1.7b": LlamaShape(hidden=2048, layers=24, heads=32, kv_heads=32, intermediate=8192),
}
TARGET_NAME = "Llama-3-8B"
TARGET = LlamaShape(hidden=4096, layers=32, heads=32, kv_heads=8, intermediate=14336, vocab=128256, tied=False)

BASES = {"float": "none", "int8": "int8", "int4": "int4"}
ATTENTIONS = {"standard": "standard", "efficient": "memory_efficient"}


# -- combinations ------------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class Combo:
    """One measured configuration: kft's base storage / attention / checkpointing, or the Trainer."""

    name: str
    framework: str  # "kft" or "hf"
    base: str  # float, int8, int4 (the Trainer: float)
    attention: str  # standard, efficient, sdpa
    checkpointing: bool

    @property
    def stores_scores(self) -> bool:
        """Whether attention keeps [tokens x tokens] scores for the backward pass."""
        return self.attention in ("standard", "sdpa")

    def kft_flags(self) -> list[str]:
        return [f"--base_quantization={BASES[self.base]}", f"--attention={ATTENTIONS[self.attention]}",
                "--gradient_checkpointing" if self.checkpointing else "--nogradient_checkpointing"]


def parse_combo(name: str) -> Combo:
    """`<float|int8|int4>-<standard|efficient>[-ckpt]` (kft) or `hf-sdpa[-ckpt]` (the Trainer)."""
    from kft.config import FlagError

    parts = name.strip().split("-")
    checkpointing = parts[-1] == "ckpt"
    core = parts[:-1] if checkpointing else parts
    if core == ["hf", "sdpa"]:
        return Combo(name, "hf", "float", "sdpa", checkpointing)
    if len(core) == 2 and core[0] in BASES and core[1] in ATTENTIONS:
        return Combo(name, "kft", core[0], core[1], checkpointing)
    raise FlagError(f"--memory_combos: unknown combination '{name}'; write <base>-<attention>[-ckpt] with base "
                    f"one of {', '.join(BASES)} and attention one of {', '.join(ATTENTIONS)} (e.g. "
                    "int4-efficient-ckpt), or hf-sdpa[-ckpt] for the Hugging Face Trainer + PEFT")


def parse_combos(names: list[str]) -> list[Combo]:
    from kft.config import FlagError

    combos = [parse_combo(n) for n in names if n.strip()]
    if not combos:
        raise FlagError("--memory_combos: name at least one combination")
    if len({c.name for c in combos}) != len(combos):
        raise FlagError(f"--memory_combos={','.join(names)}: a combination is named twice")
    return combos



# -- random-weight Hugging Face folders --------------------------------------------------------------

def _tensor_shapes(shape: LlamaShape) -> list[tuple[str, tuple[int, ...]]]:
    """Every tensor of a Hugging Face llama checkpoint, [out, in] layout, in file order."""
    out = [("model.embed_tokens.weight", (shape.vocab, shape.hidden))]
    for i in range(shape.layers):
        p = f"model.layers.{i}."
        out += [(p + "input_layernorm.weight", (shape.hidden,)),
                (p + "post_attention_layernorm.weight", (shape.hidden,))]
        out += [(p + name + ".weight", (o, n)) for name, n, o in shape.projection_shapes()]
    out.append(("model.norm.weight", (shape.hidden,)))
    if not shape.tied:
        out.append(("lm_head.weight", (shape.vocab, shape.hidden)))
    return out


def _shards(shape: LlamaShape, shard_bytes: int) -> list[list[tuple[str, tuple[int, ...]]]]:
    """The tensors grouped in file order into shards of at most `shard_bytes` (bfloat16), at least one each."""
    shards, current, size = [], [], 0
    for name, dims in _tensor_shapes(shape):
        n = 2 * math.prod(dims)
        if current and size + n > shard_bytes:
            shards.append(current)
            current, size = [], 0
        current.append((name, dims))
        size += n
    return shards + [current]


def hf_config(shape: LlamaShape, source_config: dict) -> dict:
    """config.json of a llama with `shape`, token ids and rotary settings from the tokenizer's model."""
    keep = {k: source_config[k] for k in ("bos_token_id", "eos_token_id", "pad_token_id", "rope_theta",
                                          "max_position_embeddings", "rms_norm_eps") if k in source_config}
    return {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": shape.vocab,
            "hidden_size": shape.hidden, "intermediate_size": shape.intermediate,
            "num_hidden_layers": shape.layers, "num_attention_heads": shape.heads,
            "num_key_value_heads": shape.kv_heads, "hidden_act": "silu", "tie_word_embeddings": shape.tied,
            "torch_dtype": "bfloat16", "rms_norm_eps": 1e-5, "rope_theta": 100000.0,
            "max_position_embeddings": 8192, **keep}


def write_llama_folder(folder: str, shape: LlamaShape, tokenizer_folder: str, shard_bytes: int = 512 << 20,
                       seed: int = 0) -> str:
    """A loadable Hugging Face llama folder with random bfloat16 weights: config.json, sharded
    model-*.safetensors with model.safetensors.index.json, and the tokenizer files of
    `tokenizer_folder`. Shards are written one at a time, so the writer holds one shard, never the
    whole model. A folder already written for the same shape is kept."""
    import ml_dtypes
    from safetensors.numpy import save_file

    marker = os.path.join(folder, "kft_memory_bench.json")
    wanted = {"shape": dataclasses.asdict(shape), "seed": seed, "shard_bytes": shard_bytes}
    if os.path.exists(marker):
        with open(marker) as f:
            if json.load(f) == wanted:
                return folder
    shutil.rmtree(folder, ignore_errors=True)
    os.makedirs(folder)
    rng = np.random.default_rng(seed)
    shards = _shards(shape, shard_bytes)
    weight_map, total = {}, 0
    for k, tensors in enumerate(shards, start=1):
        file = f"model-{k:05d}-of-{len(shards):05d}.safetensors"
        data = {}
        for name, dims in tensors:
            values = np.ones(dims, np.float32) if len(dims) == 1 else \
                rng.standard_normal(dims, dtype=np.float32) * np.float32(0.02)
            data[name] = values.astype(ml_dtypes.bfloat16)
            weight_map[name] = file
            total += 2 * math.prod(dims)
        save_file(data, os.path.join(folder, file), metadata={"format": "pt"})
        del data
    with open(os.path.join(folder, "model.safetensors.index.json"), "w") as f:
        json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f, indent=1)
    source_config = {}
    if os.path.exists(os.path.join(tokenizer_folder, "config.json")):
        with open(os.path.join(tokenizer_folder, "config.json")) as f:
            source_config = json.load(f)
    with open(os.path.join(folder, "config.json"), "w") as f:
        json.dump(hf_config(shape, source_config), f, indent=1)
    for name in TOKENIZER_FILES:
        if os.path.exists(os.path.join(tokenizer_folder, name)):
            shutil.copy(os.path.join(tokenizer_folder, name), os.path.join(folder, name))
    with open(marker, "w") as f:
        json.dump(wanted, f)
    return folder
