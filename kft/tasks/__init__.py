"""Tasks: each package prepares its data, builds its head, and says how to train, score and serve it.

Importing this package registers the five built-in tasks with the training core
(`kft.training.task_api`, which documents what a task module exposes). The trainer, loop, tuning
methods, strategies and checkpoints are shared by every task.
"""

from kft.tasks import causal_lm, classification, question_answering, seq2seq, token_classification
from kft.training import task_api

TASKS = {"classification": classification, "token_classification": token_classification,
         "question_answering": question_answering, "causal_lm": causal_lm, "seq2seq": seq2seq}
for _name, _module in TASKS.items():
    task_api.register(_name, _module)

get = task_api.get
