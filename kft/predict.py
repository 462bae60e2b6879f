"""Classify or tag texts with an exported SavedModel; prints one JSON line per text.

A token-classification export prints each text's entities (type, text, character span, score)
and its words with their tags; a question-answering export prints each question's answer, its
character span in the context and its score.

    python -m kft.predict --model=saved_models/<run>/<version> "a moving film"
    python -m kft.predict --model=... --input_file=texts.txt   # one text per line
    python -m kft.predict --model=saved_models/squad/1 --question="Who?" --context="..."
    python -m kft.predict --model=saved_models/squad/1 --input_file=questions.jsonl  # question, context
"""

from __future__ import annotations

import json
import sys

from kft import startup

startup.quiet_environment()  # before anything imports TensorFlow

from absl import app, flags  # noqa: E402

flags.DEFINE_string("model", "", "Exported version folder, e.g. saved_models/sst2/1.")
flags.DEFINE_string("input_file", "", "Text file with one text per line (instead of arguments).")
flags.DEFINE_integer("batch_size", 64, "Texts per call into the model.")
flags.DEFINE_string("question", "", "Question-answering exports: the question (with --context).")
flags.DEFINE_string("context", "", "Question-answering exports: the context the answer is taken from.")
FLAGS = flags.FLAGS


def predict(model, texts: list[str], labels: list[str], batch_size: int = 64):
    """Yields one result dict per text."""
    import tensorflow as tf

    serve = model.signatures["serving_default"]
    for i in range(0, len(texts), batch_size):
        chunk = texts[i:i + batch_size]
        out = serve(text=tf.constant(chunk))
        probs = out["probabilities"].numpy()
        for text, p, label in zip(chunk, probs, out["label"].numpy()):
            yield {"text": text, "label": label.decode("utf-8"),
                   "probabilities": {name: round(float(v), 6) for name, v in zip(labels, p)}}


def tag(model, texts: list[str], batch_size: int = 64):
    """Yields one result dict per text for a token-classification export."""
    import tensorflow as tf

    serve = model.signatures["serving_default"]
    for i in range(0, len(texts), batch_size):
        chunk = texts[i:i + batch_size]
        out = {k: v.numpy() for k, v in serve(text=tf.constant(chunk)).items()}
        for j, text in enumerate(chunk):
            found = []
            for e in range(int(out["entity_count"][j])):
                start, end = int(out["entity_start_char"][j, e]), int(out["entity_end_char"][j, e])
                found.append({"type": out["entity_type"][j, e].decode("utf-8"), "text": text[start:end],
                              "start": start, "end": end,
                              "score": round(float(out["entity_score"][j, e]), 6)})
            words = [[w.decode("utf-8"), t.decode("utf-8")]
                     for w, t in zip(out["words"][j], out["tags"][j]) if w]
            yield {"text": text, "entities": found, "tags": words,
                   "truncated_words": int(out["truncated_words"][j])}


def answer(model, pairs: list[dict], batch_size: int = 64):
    """Yields one result dict per {"question", "context"} for a question-answering export."""
    import tensorflow as tf

    serve = model.signatures["serving_default"]
    for i in range(0, len(pairs), batch_size):
        chunk = pairs[i:i + batch_size]
        out = {k: v.numpy() for k, v in serve(question=tf.constant([p["question"] for p in chunk]),
                                              context=tf.constant([p["context"] for p in chunk])).items()}
        for j, pair in enumerate(chunk):
            yield {**({"id": pair["id"]} if "id" in pair else {}), "question": pair["question"],
                   "answer": out["answer"][j].decode("utf-8"), "start": int(out["start_char"][j]),
                   "end": int(out["end_char"][j]), "score": round(float(out["score"][j]), 6),
                   "question_truncated": int(out["question_truncated"][j])}


def _question_pairs(argv: list[str]) -> list[dict]:
    """Questions from --question/--context or a JSONL --input_file; a bad line names file and line."""
    import tensorflow as tf

    if argv[1:]:
        raise app.UsageError("a question-answering export takes --question and --context, or --input_file")
    if FLAGS.input_file:
        pairs = []
        with tf.io.gfile.GFile(FLAGS.input_file) as f:
            for n, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    record = json.loads(line)
                except json.JSONDecodeError as e:
                    raise app.UsageError(f"{FLAGS.input_file}:{n}: not JSON ({e.msg})")
                missing = [k for k in ("question", "context") if not isinstance(record.get(k), str)]
                if missing:
                    raise app.UsageError(f"{FLAGS.input_file}:{n}: no string field {', '.join(missing)}")
                pairs.append(record)
        return pairs
    if not FLAGS.question or not FLAGS.context:
        raise app.UsageError("a question-answering export needs --question and --context (or --input_file "
                             "with JSON lines holding question and context)")
    return [{"question": FLAGS.question, "context": FLAGS.context}]


def main(argv):
    startup.import_tensorflow()
    import tensorflow as tf

    from kft import export

    if not FLAGS.model:
        raise app.UsageError("--model is required (an export version folder)")
    try:
        model = export.load(FLAGS.model)
    except FileNotFoundError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if "context" in model.signatures["serving_default"].structured_input_signature[1]:
        for result in answer(model, _question_pairs(argv), FLAGS.batch_size):
            print(json.dumps(result, ensure_ascii=False))
        return 0
    texts = list(argv[1:])
    if FLAGS.input_file:
        if texts:
            raise app.UsageError("give texts as arguments or --input_file, not both")
        with tf.io.gfile.GFile(FLAGS.input_file) as f:
            texts = [line.rstrip("\n") for line in f if line.strip()]
    if not texts:
        raise app.UsageError("no texts: pass them as arguments or with --input_file")
    if "serve_words" in model.signatures:
        results = tag(model, texts, FLAGS.batch_size)
    else:
        results = predict(model, texts, export.read_labels(FLAGS.model), FLAGS.batch_size)
    for result in results:
        print(json.dumps(result, ensure_ascii=False))
    return 0


def run():
    app.run(main)


if __name__ == "__main__":
    run()
