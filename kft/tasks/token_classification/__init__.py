"""Token classification (NER, chunking): one tag per word; data readers, word-piece alignment, the
softmax or CRF head, and the serving signatures all live in this package."""

from kft.tasks.token_classification.task import (build, build_model, crf_layer, export,  # noqa: F401
                                                 format_report, gather_words, load_data, loss_function,
                                                 predict_words, prepare)
