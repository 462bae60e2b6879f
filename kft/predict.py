"""Classify, tag or complete texts with an exported SavedModel; prints one JSON line per text.

A token-classification export prints each text's entities (type, text, character span, score)
and its words with their tags; a question-answering export prints each question's answer, its
character span in the context and its score; a decoder export (--task=causal_lm) prints each
prompt's completion, generated in the graph with the run's templates applied (--raw: none).

    python -m kft.predict --model=saved_models/<run>/<version> "a moving film"
    python -m kft.predict --model=... --input_file=texts.txt   # one text per line
    python -m kft.predict --model=saved_models/squad/1 --question="Who?" --context="..."
    python -m kft.predict --model=saved_models/squad/1 --input_file=questions.jsonl  # question, context
    python -m kft.predict --model=saved_models/demo_llm/1 "My invoice is wrong"
    python -m kft.predict --model=saved_models/demo_llm/1 --input_file=prompts.jsonl  # {"prompt": ...}
    python -m kft.predict --model=saved_models/dialogsum/1 --input_file=dev.jsonl \
        --prompt_field=dialogue --reference_field=summary --max_examples=50  # + ROUGE/BLEU on stderr
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
flags.DEFINE_boolean("raw", False, "Decoder exports: the prompts are already formatted; call generate_raw.")
flags.DEFINE_string("prompt_field", "prompt", "Decoder exports, .jsonl --input_file: the field served as "
                    "the prompt.")
flags.DEFINE_string("reference_field", "", "Decoder exports, .jsonl --input_file: a field of reference "
                    "completions; the completions are then scored (ROUGE, BLEU, exact match) on stderr.")
flags.DEFINE_integer("max_examples", 0, "Serve the first N texts of --input_file only (0: all).")
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


def generate(model, prompts: list[str], batch_size: int = 64, raw: bool = False):
    """Yields one result dict per prompt for a decoder export. serving_default applies the run's
    prompt and chat templates in the graph; raw=True calls generate_raw, which takes the prompts
    as they are (already formatted)."""
    import tensorflow as tf

    serve = model.signatures["generate_raw" if raw else "serving_default"]
    for i in range(0, len(prompts), batch_size):
        chunk = prompts[i:i + batch_size]
        out = {k: v.numpy() for k, v in serve(prompt=tf.constant(chunk, tf.string)).items()}
        for j, prompt in enumerate(chunk):
            yield {"prompt": prompt, "completion": out["completion"][j].decode("utf-8"),
                   "completion_tokens": int(out["completion_tokens"][j]), "stopped": bool(out["stopped"][j]),
                   "prompt_tokens_cut": int(out["prompt_tokens_cut"][j])}


class InputError(ValueError):
    """A model folder or input file kft.predict cannot use; reported as one line, status 2."""


def _texts(argv: list[str], decoder: bool = False, references: list | None = None) -> list[str]:
    """Texts from the arguments or --input_file: one per line, or for a decoder export a .jsonl file
    of {"prompt": ...} records (prompts that hold line breaks, such as formatted ones for --raw;
    --prompt_field names another field, and --reference_field's values go into `references`)."""
    import tensorflow as tf

    texts = list(argv[1:])
    if FLAGS.max_examples < 0:
        raise app.UsageError(f"--max_examples={FLAGS.max_examples}: must be 0 (all) or more")
    if FLAGS.reference_field and not (decoder and FLAGS.input_file.endswith(".jsonl")):
        raise app.UsageError("--reference_field: scoring needs a decoder export and a .jsonl --input_file")
    if not FLAGS.input_file:
        if not texts:
            raise app.UsageError("no texts: pass them as arguments or with --input_file")
        return texts
    if texts:
        raise app.UsageError("give texts as arguments or --input_file, not both")
    if not tf.io.gfile.exists(FLAGS.input_file):
        raise InputError(f"--input_file={FLAGS.input_file}: no such file")
    with tf.io.gfile.GFile(FLAGS.input_file) as f:
        lines = [(n, line) for n, line in enumerate(f, 1) if line.strip()]
    if decoder and FLAGS.input_file.endswith(".jsonl"):
        for n, line in lines:
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                raise InputError(f"{FLAGS.input_file}:{n}: not JSON ({e.msg})")
            for field in filter(None, (FLAGS.prompt_field, FLAGS.reference_field)):
                if not isinstance(record, dict) or not isinstance(record.get(field), str):
                    raise InputError(f"{FLAGS.input_file}:{n}: no string field {field}")
            texts.append(record[FLAGS.prompt_field])
            if FLAGS.reference_field:
                references.append(record[FLAGS.reference_field])
            if len(texts) == FLAGS.max_examples:
                break
    else:
        texts = [line.rstrip("\n") for _, line in lines][:FLAGS.max_examples or None]
    if not texts:
        raise InputError(f"--input_file={FLAGS.input_file}: the file holds no texts")
    return texts


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

    from kft.models import savedmodel as export

    if not FLAGS.model:
        raise app.UsageError("--model is required (an export version folder)")
    references, completions = [], []
    try:
        model = export.load(FLAGS.model)
        decoder = "generate_raw" in model.signatures
        if FLAGS.raw and not decoder:
            raise InputError(f"--raw: {FLAGS.model} is not a decoder export (--task=causal_lm), so it has "
                             "no generate_raw signature")
        if "context" in model.signatures["serving_default"].structured_input_signature[1]:
            results = answer(model, _question_pairs(argv), FLAGS.batch_size)
        elif decoder:
            results = generate(model, _texts(argv, decoder=True, references=references), FLAGS.batch_size,
                               raw=FLAGS.raw)
        elif "serve_words" in model.signatures:
            results = tag(model, _texts(argv), FLAGS.batch_size)
        else:
            results = predict(model, _texts(argv), export.read_labels(FLAGS.model), FLAGS.batch_size)
    except (OSError, InputError) as e:  # OSError: no saved_model.pb, or one that does not parse
        print(f"error: {e}", file=sys.stderr)
        return 2
    count = cut = 0
    for result in results:
        count += 1
        cut += result.get("prompt_tokens_cut", 0) > 0
        completions.append(result.get("completion"))
        print(json.dumps(result, ensure_ascii=False))
    if cut:
        print(f"{cut} of {count} prompt(s) cut from the start to leave room for the completion in the "
              "model's context (prompt_tokens_cut: tokens cut)", file=sys.stderr)
    if references:
        from kft.reporting import metrics  # the scores kft's evaluation reports

        scores = metrics.generation_scores(completions, references)
        print(f"scores of {count} completions against {FLAGS.reference_field}: "
              f"{json.dumps(scores)}", file=sys.stderr)
    return 0


def run():
    app.run(main)


if __name__ == "__main__":
    run()
