"""What --lora_targets=auto adapts for each task (no Keras import: the PyTorch peer reads it too)."""

from kft.config import DECODER_TASKS  # noqa: F401  (lora.py and the benchmarks read it here)

# Encoders keep query,value (measured on SST-2: the README's method table). Decoders adapt every
# linear projection a block has, as PEFT's all-linear, QLoRA and LLaMA-Factory's `lora_target: all`
# do: query,value alone trained too little on DialogSum (ROUGE-L below the untouched model's).
ENCODER_DEFAULT = ("query", "value")
ALL_LINEAR = ("query", "key", "value", "attention_output", "gate", "ffn_in", "ffn_out")
