"""Tasks: each module builds its head on a backbone and says how to train, score and serve it.

A task module exposes `build_model`, `per_example_loss`, `evaluate` and `serving_outputs`.
Token classification, extractive QA and seq2seq are sibling modules of `classification`.
"""

from kft.tasks import classification

TASKS = {"classification": classification}


def get(name: str):
    return TASKS[name]
