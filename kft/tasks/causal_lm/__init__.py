"""Decoder LLMs (GPT-style): supervised fine-tuning on chats or prompt/completion pairs (loss on the
completion), continued pretraining on plain text, evaluation by perplexity and by generation."""

from kft.tasks.causal_lm.task import (build, check_method, export, load_backbone, load_data,  # noqa: F401
                                      loss_function, prepare)
from kft.tasks.causal_lm import perplexity as perplexity_scorer  # noqa: F401,E402  (drift on general text)
