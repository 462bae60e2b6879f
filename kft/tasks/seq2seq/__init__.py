"""Encoder–decoder models (BART, T5): supervised fine-tuning on source/target pairs with the loss
on the target, evaluation by perplexity and by greedy generation, and a generating export."""

from kft.tasks.seq2seq.task import (build, check_method, export, load_backbone, load_data,  # noqa: F401
                                    loss_function, prepare)
