"""Extractive question answering (SQuAD-style): the answer is a span of the context. Data readers,
windows over long contexts, the span head, decoding, SQuAD scoring and the serving graph all live in
this package."""

from kft.tasks.question_answering.task import (build, build_model, decode, encode, export,  # noqa: F401
                                               format_report, load_backbone, load_data, loss_function,
                                               prepare)
