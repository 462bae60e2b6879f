"""Backbones (keras-hub presets, Hugging Face folders, GGUF files), adapters and SavedModel export."""
