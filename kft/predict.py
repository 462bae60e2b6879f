"""Classify or tag texts with an exported SavedModel; prints one JSON line per text.

A token-classification export prints each text's entities (type, text, character span, score)
and its words with their tags.

    python -m kft.predict --model=saved_models/<run>/<version> "a moving film"
    python -m kft.predict --model=... --input_file=texts.txt   # one text per line
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


def main(argv):
    startup.import_tensorflow()
    import tensorflow as tf

    from kft import export

    texts = list(argv[1:])
    if FLAGS.input_file:
        if texts:
            raise app.UsageError("give texts as arguments or --input_file, not both")
        with tf.io.gfile.GFile(FLAGS.input_file) as f:
            texts = [line.rstrip("\n") for line in f if line.strip()]
    if not texts:
        raise app.UsageError("no texts: pass them as arguments or with --input_file")
    if not FLAGS.model:
        raise app.UsageError("--model is required (an export version folder)")
    try:
        model = export.load(FLAGS.model)
    except FileNotFoundError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
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
