"""Tiny random decoders written the way real checkpoints ship: Hugging Face llama and gpt2 folders,
and a llama GGUF file (llama.cpp's tensor names and query/key row order, F32 and Q8_0 tensors).

The byte-level BPE vocabulary is learned here from a few sentences (256 byte symbols, a few dozen
merges, ChatML special tokens), so keras-hub's tokenizer, the GGUF tokenizer fields and the chat
template all see a real, if small, tokenizer.
"""

from __future__ import annotations

import collections
import json
import os

import numpy as np

CHATML = ("{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + "
          "'<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}"
          "{% endif %}")
SPECIAL = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
TEXT = ("what is the capital of france ? paris is the capital . summarize the following dialogue . "
        "the cat sat on the mat . translate to german : a man is sleeping . ein mann schläft . "
        "hello , how are you ? i am fine , thank you . the weather is nice today .")


def byte_unicode() -> dict[int, str]:
    """GPT-2's reversible map from bytes to printable characters (byte-level BPE symbols)."""
    keep = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + \
        list(range(ord("®"), ord("ÿ") + 1))
    chars, n = keep[:], 0
    for b in range(256):
        if b not in keep:
            keep.append(b)
            chars.append(256 + n)
            n += 1
    return dict(zip(keep, map(chr, chars)))


def bpe_vocabulary(num_merges: int = 60) -> tuple[list[str], list[str]]:
    """(tokens by id, merges): special tokens, the 256 byte symbols, then one token per merge."""
    table = byte_unicode()
    words = collections.Counter()
    for i, word in enumerate(TEXT.split(" ")):
        symbols = "".join(table[b] for b in ((" " if i else "") + word).encode("utf-8"))
        words[tuple(symbols)] += 1
    tokens = SPECIAL + [table[b] for b in range(256)]
    merges = []
    for _ in range(num_merges):
        pairs = collections.Counter()
        for word, count in words.items():
            for a, b in zip(word, word[1:]):
                pairs[a, b] += count
        if not pairs:
            break
        (a, b), _ = max(pairs.items(), key=lambda kv: (kv[1], kv[0]))
        merges.append(f"{a} {b}")
        tokens.append(a + b)
        merged = collections.Counter()
        for word, count in words.items():
            out, i = [], 0
            while i < len(word):
                if i + 1 < len(word) and (word[i], word[i + 1]) == (a, b):
                    out.append(a + b)
                    i += 2
                else:
                    out.append(word[i])
                    i += 1
            merged[tuple(out)] += count
        words = merged
    return tokens, merges


def llama_weights(vocab: int, hidden: int = 32, layers: int = 2, heads: int = 4, kv_heads: int = 2,
                  intermediate: int = 64, seed: int = 0, scale: float = 0.05) -> dict[str, np.ndarray]:
    """Random llama weights under Hugging Face names, [out, in] layout, tied embeddings. At the
    default scale greedy decoding repeats one token whatever the prompt; scale=1 gives a model whose
    greedy tokens depend on the prompt and the positions."""
    rng = np.random.default_rng(seed)
    head_dim = hidden // heads

    def w(*shape):
        return (rng.standard_normal(shape) * scale).astype(np.float32)

    t = {"model.embed_tokens.weight": w(vocab, hidden),
         "model.norm.weight": (1 + 0.1 * rng.standard_normal(hidden)).astype(np.float32)}
    for i in range(layers):
        p = f"model.layers.{i}."
        t[p + "input_layernorm.weight"] = (1 + 0.1 * rng.standard_normal(hidden)).astype(np.float32)
        t[p + "post_attention_layernorm.weight"] = (1 + 0.1 * rng.standard_normal(hidden)).astype(np.float32)
        t[p + "self_attn.q_proj.weight"] = w(heads * head_dim, hidden)
        t[p + "self_attn.k_proj.weight"] = w(kv_heads * head_dim, hidden)
        t[p + "self_attn.v_proj.weight"] = w(kv_heads * head_dim, hidden)
        t[p + "self_attn.o_proj.weight"] = w(hidden, heads * head_dim)
        t[p + "mlp.gate_proj.weight"] = w(intermediate, hidden)
        t[p + "mlp.up_proj.weight"] = w(intermediate, hidden)
        t[p + "mlp.down_proj.weight"] = w(hidden, intermediate)
    return t


LLAMA = dict(hidden=32, layers=2, heads=4, kv_heads=2, intermediate=64)


def write_llama_folder(folder: str, tensors: dict | None = None, chat_template: str | None = CHATML,
                       seed: int = 0) -> str:
    """A Hugging Face llama folder (safetensors, config.json, tokenizer.json, tokenizer_config.json)."""
    from safetensors.numpy import save_file

    tokens, merges = bpe_vocabulary()
    tensors = tensors or llama_weights(len(tokens), seed=seed, **LLAMA)
    os.makedirs(folder, exist_ok=True)
    save_file(tensors, os.path.join(folder, "model.safetensors"), metadata={"format": "pt"})
    config = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": len(tokens),
              "hidden_size": LLAMA["hidden"], "intermediate_size": LLAMA["intermediate"],
              "num_hidden_layers": LLAMA["layers"], "num_attention_heads": LLAMA["heads"],
              "num_key_value_heads": LLAMA["kv_heads"], "rms_norm_eps": 1e-5, "rope_theta": 10000.0,
              "max_position_embeddings": 256, "tie_word_embeddings": True, "hidden_act": "silu",
              "bos_token_id": 1, "eos_token_id": 2}
    with open(os.path.join(folder, "config.json"), "w") as f:
        json.dump(config, f)
    tokenizer = {
        "version": "1.0", "truncation": None, "padding": None, "normalizer": None, "post_processor": None,
        "added_tokens": [{"id": i, "content": s, "special": True, "single_word": False, "lstrip": False,
                          "rstrip": False, "normalized": False} for i, s in enumerate(SPECIAL)],
        "pre_tokenizer": {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True,
                          "use_regex": True},
        "decoder": {"type": "ByteLevel", "add_prefix_space": True, "trim_offsets": True, "use_regex": True},
        "model": {"type": "BPE", "dropout": None, "unk_token": None, "continuing_subword_prefix": None,
                  "end_of_word_suffix": None, "fuse_unk": False, "byte_fallback": False,
                  "vocab": {t: i for i, t in enumerate(tokens)}, "merges": merges}}
    with open(os.path.join(folder, "tokenizer.json"), "w") as f:
        json.dump(tokenizer, f, ensure_ascii=False)
    tokenizer_config = {"bos_token": "<|im_start|>", "eos_token": "<|im_end|>", "pad_token": "<|im_end|>",
                        "unk_token": "<|endoftext|>", "add_bos_token": False}
    if chat_template:
        tokenizer_config["chat_template"] = chat_template
    with open(os.path.join(folder, "tokenizer_config.json"), "w") as f:
        json.dump(tokenizer_config, f, ensure_ascii=False)
    return folder


def write_sharp_llama_folder(folder: str) -> str:
    """A llama folder whose greedy tokens depend on the prompt and the positions (weights at scale 1):
    for checks that two generation paths agree, which a model repeating one token cannot fail."""
    return write_llama_folder(folder, tensors=llama_weights(len(bpe_vocabulary()[0]), scale=1.0, **LLAMA))


def write_llama_gguf(path: str, tensors: dict, quantize: tuple[str, ...] = ("mlp.",)) -> dict:
    """The same model as a llama GGUF file; tensors whose name contains one of `quantize` are Q8_0.

    Returns the weights as the file holds them after dequantisation (HF names and layout): what a
    correct reader must give back.
    """
    import gguf

    from kft.models.gguf_import import permute

    tokens, merges = bpe_vocabulary()
    writer = gguf.GGUFWriter(path, "llama")
    writer.add_block_count(LLAMA["layers"])
    writer.add_context_length(256)
    writer.add_embedding_length(LLAMA["hidden"])
    writer.add_feed_forward_length(LLAMA["intermediate"])
    writer.add_head_count(LLAMA["heads"])
    writer.add_head_count_kv(LLAMA["kv_heads"])
    writer.add_layer_norm_rms_eps(1e-5)
    writer.add_rope_freq_base(10000.0)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("default")
    writer.add_token_list(tokens)
    writer.add_token_types([3] * len(SPECIAL) + [1] * (len(tokens) - len(SPECIAL)))
    writer.add_token_merges(merges)
    writer.add_bos_token_id(1)
    writer.add_eos_token_id(2)
    writer.add_pad_token_id(2)
    writer.add_add_bos_token(False)
    writer.add_chat_template(CHATML)
    names = {"input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm",
             "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
             "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
             "mlp.down_proj": "ffn_down"}
    expected = {}
    for name, value in tensors.items():
        if name == "model.embed_tokens.weight":
            gname = "token_embd.weight"
        elif name == "model.norm.weight":
            gname = "output_norm.weight"
        else:
            layer, rest = name.split(".")[2], ".".join(name.split(".")[3:-1])
            gname = f"blk.{layer}.{names[rest]}.weight"
        stored = value
        if "q_proj" in name:
            stored = permute(value, LLAMA["heads"])
        elif "k_proj" in name:
            stored = permute(value, LLAMA["kv_heads"])
        if any(q in name for q in quantize):
            data = gguf.quants.quantize(stored, gguf.GGMLQuantizationType.Q8_0)
            writer.add_tensor(gname, data, raw_dtype=gguf.GGMLQuantizationType.Q8_0)
            expected[name] = gguf.quants.dequantize(data, gguf.GGMLQuantizationType.Q8_0).reshape(value.shape)
        else:
            writer.add_tensor(gname, stored)
            expected[name] = value
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return expected


def write_gpt2_folder(folder: str, seed: int = 0) -> str:
    """A Hugging Face gpt2 folder (safetensors, config.json, vocab.json, merges.txt), no chat template."""
    from safetensors.numpy import save_file

    tokens, merges = bpe_vocabulary()
    tokens = [t for t in tokens if t not in SPECIAL[1:]]  # gpt2 knows <|endoftext|> only
    rng = np.random.default_rng(seed)
    hidden, layers, positions = 32, 2, 128

    def w(*shape):
        return (rng.standard_normal(shape) * 0.05).astype(np.float32)

    t = {"wte.weight": w(len(tokens), hidden), "wpe.weight": w(positions, hidden),
         "ln_f.weight": np.ones(hidden, np.float32), "ln_f.bias": np.zeros(hidden, np.float32)}
    for i in range(layers):
        p = f"h.{i}."
        t.update({p + "ln_1.weight": np.ones(hidden, np.float32), p + "ln_1.bias": np.zeros(hidden, np.float32),
                  p + "ln_2.weight": np.ones(hidden, np.float32), p + "ln_2.bias": np.zeros(hidden, np.float32),
                  p + "attn.c_attn.weight": w(hidden, 3 * hidden), p + "attn.c_attn.bias": w(3 * hidden),
                  p + "attn.c_proj.weight": w(hidden, hidden), p + "attn.c_proj.bias": w(hidden),
                  p + "mlp.c_fc.weight": w(hidden, 4 * hidden), p + "mlp.c_fc.bias": w(4 * hidden),
                  p + "mlp.c_proj.weight": w(4 * hidden, hidden), p + "mlp.c_proj.bias": w(hidden)})
    os.makedirs(folder, exist_ok=True)
    save_file(t, os.path.join(folder, "model.safetensors"), metadata={"format": "pt"})
    config = {"architectures": ["GPT2LMHeadModel"], "model_type": "gpt2", "vocab_size": len(tokens),
              "n_embd": hidden, "n_layer": layers, "n_head": 4, "n_positions": positions, "n_ctx": positions,
              "n_inner": None, "layer_norm_epsilon": 1e-5, "bos_token_id": 0, "eos_token_id": 0,
              "resid_pdrop": 0.0, "embd_pdrop": 0.0, "attn_pdrop": 0.0, "activation_function": "gelu_new"}
    return write_config_and_bpe(folder, config, tokens, merges)


def write_config_and_bpe(folder: str, config: dict, tokens: list[str], merges: list[str]) -> str:
    """config.json and a byte-level BPE tokenizer (vocab.json, merges.txt) in a Hugging Face folder."""
    with open(os.path.join(folder, "config.json"), "w") as f:
        json.dump(config, f)
    with open(os.path.join(folder, "vocab.json"), "w") as f:
        json.dump({tok: i for i, tok in enumerate(tokens)}, f, ensure_ascii=False)
    with open(os.path.join(folder, "merges.txt"), "w") as f:
        f.write("#version: 0.2\n" + "\n".join(merges) + "\n")
    return folder


def write_jsonl(path, records) -> str:
    """The records as a JSONL file at `path`; its path as a string."""
    with open(path, "w") as f:
        for r in records:
            f.write(json.dumps(r) + "\n")
    return str(path)


def chats(n: int, seed: int = 0) -> list[dict]:
    """`n` seeded random one-turn chats over TEXT's words."""
    rng = np.random.default_rng(seed)
    words = TEXT.split()
    return [{"messages": [{"role": "user", "content": " ".join(rng.choice(words, rng.integers(3, 12)))},
                          {"role": "assistant", "content": " ".join(rng.choice(words, rng.integers(1, 5)))}]}
            for _ in range(n)]


def exported_chat_run(folder: str, tmp):
    """A LoRA run of the llama in `folder` on tiny chats, exported under `tmp` (model_dir tmp/m,
    export_dir tmp/x, run tiny_lm): the fitted run."""
    from kft.training import trainer
    from kft.config import Config

    config = Config(task="causal_lm", backbone=folder, method="lora", lora_targets=["query", "value"],
                    train_file=write_jsonl(tmp / "train.jsonl", chats(24, 0)),
                    eval_file=write_jsonl(tmp / "eval.jsonl", chats(10, 1)), epochs=1, batch_size=4,
                    learning_rate=1e-3, warmup_ratio=0.0, seed=3, max_new_tokens=8, export=True,
                    export_dir=str(tmp / "x"), model_dir=str(tmp / "m"), checkpoint_every_steps=0,
                    run_name="tiny_lm", drift=False)
    return trainer.fit_model(config, str(tmp / "m"))
