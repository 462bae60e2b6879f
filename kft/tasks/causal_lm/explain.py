"""Integrated-gradient attributions of a decoder run's greedy completion to the words of its prompt.

For each text: the prompt the run builds from it (its --prompt_template, its chat template, cut
from the start to the run's --sequence_length), the completion the run generates (greedy, up to its
--max_new_tokens, the stop token included when it stopped; --target gives a completion instead),
and f = log p(completion | prompt), the sum of the completion tokens' log-probabilities,
teacher-forced on prompt + completion, with logits formed only at the completion's positions.

Only the embeddings of the text's own tokens move along the path from the padding embedding:
 - the completion's stay as they are: the thing explained is then the same at every step
   (interpolated too, the completion would be credited with raising its own probability);
 - so do the tokens the templates add around the text (start token, system prompt, role markers),
   as the encoder tasks keep [CLS] and [SEP]: the baseline is the same chat with the text's tokens
   blanked to padding. Interpolating them as well (and reporting their total apart) was tried: on
   SmolLM2 (after 6 LoRA steps of flags/demo_llm.cfg) the path then runs through prompts of no
   kind the model has seen, f falls from -85 to -159 and back to -21 with spikes no 64-step rule
   resolves, and the attributions missed f(input) - f(baseline) by 178% and 21% for two support
   messages; the text alone, by 0.14% and 0.0004%.
So the attributions of the text's words sum to f(input) - f(baseline).
"""

from __future__ import annotations

import bisect
import math
import re

import numpy as np

from kft.analysis import attributions

TEMPLATE = -1  # piece_word of a token that is not the text's (start token, templates, completion)
# Rows x positions x layers x hidden units per batch of interpolation steps (for SmolLM2, about
# 970 positions): the gradient keeps every layer's activations of a batch.
ACTIVATION_BUDGET = 1 << 24
_SENTINEL = "KFTEXPLAINTEXT"


def _strings(values) -> list[str]:
    """keras-hub's detokenize returns str (Python path) or byte tensors (TensorFlow path)."""
    if hasattr(values, "numpy"):
        values = values.numpy()
    values = values if isinstance(values, (list, np.ndarray)) else [values]
    return [v.decode("utf-8", "replace") if isinstance(v, bytes) else str(v) for v in values]


def _format(run) -> str:
    train = run.metrics.get("data", {}).get("train", {})
    if isinstance(train, dict) and train.get("format"):
        return train["format"]
    return "template" if run.config.prompt_template else "prompt_completion"


def build_prompt(run, text: str) -> tuple[str, int, str | None]:
    """(the rendered prompt, where `text` starts in it, the chat template used) as the run builds it."""
    from kft.config import FlagError
    from kft.tasks.causal_lm import data as data_lib, inputs as lm_inputs

    form = _format(run)
    if form == "text":
        return text, 0, None  # continued pretraining: the text is the start of a document
    template = None if run.config.chat_template == "none" else run.loaded.chat_template
    if form == "template":
        fields = sorted(set(data_lib.template_fields(run.config.prompt_template)))
        if len(fields) != 1:
            raise FlagError(f"the run's --prompt_template={run.config.prompt_template!r} reads the fields "
                            f"{fields}; kft.explain fills one field with each text")

        def content(s):
            return data_lib.unescape(run.config.prompt_template).format(**{fields[0]: s})
    else:
        def content(s):
            return s

    def render(s):
        example = data_lib.Example([{"role": "user", "content": content(s)}], "", 0)
        return lm_inputs.prompt_text(example, template, run.loaded.special_tokens)

    prompt, marked = render(text), render(_SENTINEL)
    start = marked.find(_SENTINEL)
    if start < 0 or not prompt.startswith(marked[:start]) or prompt[start:start + len(text)] != text:
        start = prompt.rfind(text)  # a template that rewrites its content around the text
    if start < 0:
        raise FlagError(f"the run's templates change the text {text[:40]!r}: its words cannot be found in "
                        "the prompt")
    return prompt, start, template


def piece_spans(tokenizer, ids: np.ndarray) -> tuple[str, np.ndarray, np.ndarray]:
    """(the decoded ids, each piece's [start, end) in it): from the decoded prefixes, in one call.

    A prefix that ends inside a character decodes with replacement characters; each end is the
    shortest decoding of this or any longer prefix, so such a piece ends where its character does.
    """
    if not len(ids):
        return "", np.zeros(0, np.int64), np.zeros(0, np.int64)
    decoded = _strings(tokenizer.detokenize([[int(i) for i in ids[:k]] for k in range(1, len(ids) + 1)]))
    ends = np.minimum.accumulate(np.asarray([len(s) for s in decoded])[::-1])[::-1]
    return decoded[-1], np.concatenate([[0], ends[:-1]]), ends


def piece_words(starts: np.ndarray, ends: np.ndarray, word_starts: list[int], word_ends: list[int],
                text_start: int, text_end: int) -> np.ndarray:
    """Word index of each piece (its largest overlap; whitespace inside the text goes to the next
    word, as byte-level BPE joins a space to the word after it; a piece holding the rest of a
    character the piece before began goes with that one), or TEMPLATE outside the text."""
    owner = np.full(len(starts), TEMPLATE, np.int32)
    for p, (a, b) in enumerate(zip(starts, ends)):
        if b <= a:
            owner[p] = owner[p - 1] if p else TEMPLATE
            continue
        first = bisect.bisect_right(word_ends, a)  # the first word ending after a
        best, overlap = -1, 0
        for w in range(first, len(word_starts)):
            if word_starts[w] >= b:
                break
            size = min(b, word_ends[w]) - max(a, word_starts[w])
            if size > overlap:
                best, overlap = w, size
        if best >= 0:
            owner[p] = best
        elif word_starts and text_start <= a and b <= text_end:
            owner[p] = min(first, len(word_starts) - 1)
    return owner


def _rows_per_batch(backbone, length: int, steps: int) -> int:
    units = length * int(getattr(backbone, "num_layers", 1)) * int(getattr(backbone, "hidden_dim", 1))
    cap = max(1, ACTIVATION_BUDGET // max(1, units))
    batches = math.ceil((steps + 1) / cap)
    return math.ceil((steps + 1) / batches)  # equal batches rather than a full one and a remainder


def completion_log_probs(embedding, hidden, start: int, completion):
    """[rows, n]: log p of each completion token given what precedes it, from the hidden states
    [rows, length, hidden] at the n positions before the completion's tokens (logits only there)."""
    import tensorflow as tf

    n = len(completion)
    picked = hidden[:, start - 1:start - 1 + n]
    logits = tf.cast(embedding(picked, reverse=True), tf.float32)
    targets = tf.broadcast_to(tf.constant(np.asarray(completion, np.int32))[None], tf.shape(logits)[:2])
    return -tf.nn.sparse_softmax_cross_entropy_with_logits(targets, logits)


def attribute(model, token_ids: np.ndarray, start: int, completion: np.ndarray, content: np.ndarray,
              pad_id: int, steps: int, padding_mask: np.ndarray | None = None,
              rows_per_batch: int | None = None, max_steps: int | None = None) -> attributions.Attribution:
    """Integrated gradients of log p(completion | token_ids[:start]) over the `content` positions.

    token_ids: the prompt (start token included) followed by the completion without its last token;
    completion: [n] the tokens whose log-probabilities f sums. Positions from `start` on are never
    interpolated. Without `rows_per_batch`, all steps run in one batch. `max_steps`: refine up to this
many intervals where the completeness gap is above 1% (attributions.integrated_gradients).
    """
    import tensorflow as tf

    from kft.tasks.causal_lm import model as lm_model

    embedding = lm_model.token_embedding(model)
    if padding_mask is None:
        padding_mask = np.ones_like(token_ids)
    if rows_per_batch is None:
        rows_per_batch = steps + 1
    content = content & (np.arange(len(token_ids)) < start)

    def target(hidden):
        return tf.reduce_sum(completion_log_probs(embedding, hidden, start, completion), axis=-1)

    return attributions.integrated_gradients(model, token_ids, padding_mask, content, target, pad_id, steps,
                                             rows_per_batch, embedding=embedding, max_steps=max_steps)


def prepare_prompt(run, text: str, reserve: int):
    """The prompt's ids (start token first, cut from the start as the run cuts) and their word map."""
    loaded = run.loaded
    prompt, text_start, template = build_prompt(run, text)
    pieces = np.asarray(loaded.tokenizer(prompt), np.int32).reshape(-1)
    decoded, starts, ends = piece_spans(loaded.tokenizer, pieces)
    if decoded != prompt:  # a tokenizer that does not decode to its input: find the text again
        text_start = decoded.rfind(text)
        if text_start < 0:
            from kft.config import FlagError

            raise FlagError(f"the tokenizer does not give back the text {text[:40]!r}: its words cannot be "
                            "located in the prompt's tokens")
    spans = [(m.start(), m.end()) for m in re.finditer(r"\S+", text)]
    owner = piece_words(starts, ends, [text_start + a for a, _ in spans], [text_start + b for _, b in spans],
                        text_start, text_start + len(text))
    bos = [loaded.bos_id] if loaded.bos_id is not None and not (template and "bos_token" in template) else []
    # As the run's inputs.encode: the prompt cut from its start to leave room for an end token, and
    # never past the backbone's positions with the completion.
    room = min(run.sequence_length - len(bos) - 1, loaded.max_sequence_length - len(bos) - reserve)
    cut = max(0, len(pieces) - max(room, 1))
    ids = np.asarray(bos + list(pieces[cut:]), np.int32)
    if not len(ids):
        from kft.config import FlagError

        raise FlagError(f"the text {text!r} makes an empty prompt: nothing to generate from")
    piece_word = np.concatenate([np.full(len(bos), TEMPLATE, np.int32), owner[cut:]])
    return prompt, ids, piece_word, [text[a:b] for a, b in spans], spans, cut


def _completion(run, prompt_ids: np.ndarray, generated: np.ndarray, stopped: bool):
    """(completion ids, with the stop token when generation stopped; log p of each one): one
    teacher-forced pass, the stop token read off as the argmax after the last generated token."""
    import tensorflow as tf

    from kft.tasks.causal_lm import model as lm_model

    ids = np.concatenate([prompt_ids, generated]).astype(np.int32)
    hidden = run.model({"token_ids": tf.constant(ids[None]), "padding_mask": tf.ones([1, len(ids)], tf.int32)},
                       training=False)
    start = len(prompt_ids)
    embedding = lm_model.token_embedding(run.model)
    logits = tf.cast(embedding(hidden[:, start - 1:], reverse=True), tf.float32)[0]
    completion = np.asarray(generated, np.int32)
    if stopped:
        completion = np.append(completion, np.int32(int(tf.argmax(logits[-1]))))
    log_probs = tf.nn.log_softmax(logits[:len(completion)], axis=-1).numpy()
    return completion, log_probs[np.arange(len(completion)), completion].astype(np.float64)


def explain(run, texts: list[str], steps: int, target: str = "", max_steps: int | None = None) -> list[dict]:
    """One record per text: the completion, its probability, and attributions per word of the text."""
    from kft.config import FlagError
    from kft.methods import prompt as prompt_lib
    from kft.tasks.causal_lm import model as lm_model

    loaded = run.loaded
    max_new = run.config.max_new_tokens
    forced = np.asarray(loaded.tokenizer(target), np.int32).reshape(-1) if target else None
    if forced is not None and not len(forced):
        raise FlagError(f"--target={target!r}: the completion to explain has no tokens")
    if forced is None and max_new <= 0:
        raise FlagError(f"the run has --max_new_tokens={max_new}, so nothing is generated; give the "
                        "completion to explain with --target")
    prepared = [prepare_prompt(run, text, len(forced) if forced is not None else max_new) for text in texts]
    if forced is None:
        generator = lm_model.Generator(loaded.backbone, loaded.causal_lm_class, loaded.stop_ids, loaded.pad_id,
                                       min(8, len(texts)), prompt=prompt_lib.prompt_layer(run.model))
        generated, stopped = generator([p[1] for p in prepared], max_new)
    else:
        generated, stopped = [forced] * len(texts), [False] * len(texts)
    records = []
    for text, (prompt, prompt_ids, piece_word, words, spans, cut), new, stop in zip(
            texts, prepared, generated, stopped):
        completion, log_probs = _completion(run, prompt_ids, np.asarray(new, np.int32), bool(stop))
        start = len(prompt_ids)
        token_ids = np.concatenate([prompt_ids, completion[:-1]]).astype(np.int32)
        word_map = np.concatenate([piece_word, np.full(len(completion) - 1, TEMPLATE, np.int32)])
        result = attribute(run.model, token_ids, start, completion, word_map >= 0, loaded.pad_id, steps,
                           rows_per_batch=_rows_per_batch(loaded.backbone, len(token_ids), steps),
                           max_steps=max_steps)
        per_word = attributions.word_attributions(result, word_map, len(words))
        shown = _strings(loaded.tokenizer.detokenize([int(i) for i in new]))[0] if len(new) else ""
        probability = float(np.exp(log_probs).mean())
        what = "--target completion" if forced is not None else (
            "generated completion" + ("" if stop else f" (cut at --max_new_tokens={max_new})"))
        records.append({
            "text": text, "completion": shown, "explained": "target" if forced is not None else "generated",
            "completion_ids": [int(i) for i in completion], "stopped": bool(stop),
            "log_probability": float(log_probs.sum()), "mean_token_probability": probability,
            "token_probabilities": [round(float(p), 6) for p in np.exp(log_probs)],
            "title": f"{what}: mean token probability {probability:.3f} over {len(completion)} token(s)"
                     + (" (stop token included)" if stop else ""),
            "words": [{"word": word, "start": a, "end": b, "attribution": float(v)}
                      for word, (a, b), v in zip(words, spans, per_word)],
            "note": f"f = log p(completion | prompt) = {result.output:.4f}; with the text's tokens blanked "
                    f"to padding (the baseline) {result.baseline_output:.4f}"
                    + (f"; {cut} prompt token(s) cut from the start" if cut else ""),
            "prompt": prompt,
            "f_input": result.output, "f_baseline": result.baseline_output, "attribution_sum": result.total,
            "completeness_error": result.completeness_error, "ig_steps": result.steps, "truncated_pieces": cut,
        })
    return records
