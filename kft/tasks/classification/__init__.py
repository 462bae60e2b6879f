"""Text classification: one label per text (sentiment, topic, intent, ...)."""

from kft.tasks.classification.task import (build, build_model, evaluate, export, load_data,  # noqa: F401
                                           loss_function, per_example_loss, prepare, serving_outputs)
