"""The generating SavedModel of a decoder run: text in, generated text out, all in the graph.

keras-hub's `model.export()` writes the forward pass only, and its `generate` post-processes with
numpy, so a served keras-hub decoder cannot generate. Here the export's endpoints hold the whole
path, so TensorFlow Serving (or any process with `tensorflow` and `tensorflow_text`) serves it:

  serving_default  prompt (tf.string [batch]): the input as the training data gave it (the user's
                   turn, the --prompt_template field, or the prompt field); the run's prompt
                   template and chat template are applied in the graph.
  generate_raw     prompt (tf.string [batch]): an already formatted prompt, used as it is.
     both return   completion (tf.string), completion_tokens (int32), stopped (bool: a stop token
                   came before the length cap), prompt_tokens_cut (int32: tokens cut from the start
                   of a prompt longer than the context leaves room for).
  first_token      prompt as for serving_default -> token_id (int32; -1 when the first token is a
                   stop token), token (tf.string), prompt_tokens_cut: the time to first token.
  serve_token_ids  token_ids, padding_mask (int32 [batch, length]) -> token_log_probs [batch, length]
                   (log p of each token given those before it; 0 at position 0 and at padding) and
                   next_token_log_probs [batch, vocabulary] after each row's last token.

Generation: the prompt rows are right-padded, prefilled into keras-hub's KV cache, and decoded one
token per loop step with `call_with_cache`; a row keeps its own prompt tokens until its length, so
its completion does not depend on the other rows of the batch (the loop kft evaluates with).
--export_sampler picks each token: greedy (the default), top_k or top_p sampling with a fixed seed,
or beam search (`Endpoints._beam`: --export_num_beams hypotheses per prompt in one widened batch).
"""

from __future__ import annotations

import keras
import tensorflow as tf
from absl import logging

from kft.methods import prompt as prompt_lib
from kft.tasks.causal_lm import chat, data as data_lib, graph_tokenizer, model as lm_model

_SENTINEL = "\ue001kft-prompt\ue001"


class ExportError(ValueError):
    """The run cannot be served as a generating SavedModel; the message says why."""


def prompt_affixes(config, loaded, template: str | None, train: data_lib.Examples) -> tuple[str, str, str]:
    """(text before, text after, what the served `prompt` is): the rendered training prompt around
    the served input, found by rendering the run's templates around a sentinel."""
    leading, described = [], "the user's turn"
    if train.format == "messages":
        # Context turns every training example starts with (a fixed system prompt) are kept.
        first = train.examples[0].messages[:-1]
        if first and all(e.messages[:-1] == first for e in train.examples):
            leading = first
            described += f" (after the {len(first)} context turn(s) every training chat starts with)"
        elif any(len(e.messages) > 1 for e in train.examples):
            described += " (training chats had differing earlier turns; served prompts have none)"
    content = _SENTINEL
    if train.format == "template":
        fields = data_lib.template_fields(config.prompt_template)
        if len(fields) == 1:
            content = data_lib.unescape(config.prompt_template).format(**{fields[0]: _SENTINEL})
            described = f"the '{fields[0]}' field (--prompt_template applied in the graph)"
        else:
            described = (f"the user's turn: --prompt_template reads {len(fields)} fields, so the client "
                         "fills it")
    elif train.format == "prompt_completion":
        described = f"the '{config.prompt_field}' field"
    messages = leading + [{"role": "user", "content": content}]
    rendered = (chat.render(template, messages, add_generation_prompt=True, special_tokens=loaded.special_tokens)
                if template else chat.plain(messages) + "\n")
    parts = rendered.split(_SENTINEL)
    if len(parts) != 2:
        raise ExportError(f"the chat template uses the prompt {len(parts) - 1} times (or changes it), so "
                          "the export cannot place a served prompt in it; use --chat_template=none")
    return parts[0], parts[1], described


def check_sampler(config, beam: bool = True) -> None:
    """Refuses --export_sampler settings the export cannot honour, before any training; `beam`: whether
    the task's export has beam search."""
    if not config.export:
        return
    if config.export_sampler == "beam" and not beam:
        raise ExportError(f"--export_sampler=beam is built for decoder exports (--task=causal_lm); "
                          f"--task={config.task} exports greedy, top_k or top_p")
    if config.export_sampler == "beam" and config.export_num_beams < 1:
        raise ExportError(f"--export_num_beams={config.export_num_beams}: must be at least 1")
    if config.export_sampler in ("top_k", "top_p") and config.export_temperature <= 0:
        raise ExportError(f"--export_temperature={config.export_temperature}: must be positive")


def _pick(config):
    """The token chooser of --export_sampler: fn(logits [b, v] float32, step seed) -> ids [b]."""
    check_sampler(config)
    if config.export_sampler in ("greedy", "beam"):  # beam search picks its own tokens (Endpoints._beam)
        return lambda logits, seed: tf.argmax(logits, axis=-1, output_type=tf.int32)
    temperature = float(config.export_temperature)

    def sample(logits, seed):
        logits = logits / temperature
        if config.export_sampler == "top_k":
            k = tf.minimum(int(config.export_top_k), tf.shape(logits)[-1])
            kth = tf.math.top_k(logits, k=k).values[:, -1:]
            logits = tf.where(logits < kth, float("-inf"), logits)
        else:  # top_p: the smallest set of likeliest tokens whose probability reaches p
            order = tf.argsort(logits, axis=-1, direction="DESCENDING")
            probs = tf.nn.softmax(tf.gather(logits, order, batch_dims=1), axis=-1)
            outside = tf.cumsum(probs, axis=-1, exclusive=True) >= float(config.export_top_p)
            cut = tf.where(outside, float("-inf"), tf.gather(logits, order, batch_dims=1))
            logits = tf.scatter_nd(tf.stack([tf.repeat(tf.range(tf.shape(order)[0])[:, None],
                                                       tf.shape(order)[1], axis=1), order], axis=-1),
                                   cut, tf.shape(logits))
        return tf.cast(tf.random.stateless_categorical(logits, 1, seed)[:, 0], tf.int32)

    return sample


def export_max_new_tokens(config) -> int:
    """The export's generation cap: --export_max_new_tokens, else --max_new_tokens."""
    max_new_tokens = int(config.export_max_new_tokens or config.max_new_tokens)
    if max_new_tokens < 1:
        raise ExportError("the export generates nothing with --max_new_tokens=0; give "
                          "--export_max_new_tokens=N")
    return max_new_tokens


class TextEndpoints:
    """Text in, completion out, for the generating exports (decoder and encoder–decoder): the graph
    tokenizer, the fixed text around the served input, and batches of any size, an empty one
    included. A subclass gives `_completions(texts) -> (ragged ids, stopped, tokens cut)`."""

    def __init__(self, lm, tokenizer, prefix: str, suffix: str):
        self.lm = lm
        self.bpe = graph_tokenizer.for_tokenizer(tokenizer)
        self.tokenizer = tokenizer
        self.prefix, self.suffix = prefix, suffix

    @classmethod
    def create(cls, *args):
        """The endpoints, or an ExportError that says why the run cannot have them."""
        try:
            return cls(*args)
        except ValueError as e:
            raise ExportError(str(e)) from None

    def tokenize(self, texts):
        if self.bpe is not None:
            return self.bpe.tokenize(texts)
        return tf.cast(self.tokenizer(texts), tf.int32)

    def detokenize(self, ids):
        if self.bpe is not None:
            return self.bpe.detokenize(ids)
        return self.tokenizer.detokenize(ids)

    def _complete(self, texts):
        texts = tf.convert_to_tensor(texts, tf.string)

        def run():
            ids, stopped, cut = self._completions(texts)
            # Byte-level tokens can end inside a character: invalid UTF-8 becomes U+FFFD, as the
            # in-memory evaluation decodes it (errors="replace").
            text = tf.strings.unicode_transcode(self.detokenize(ids), "UTF-8", "UTF-8", errors="replace",
                                                replace_control_characters=False)
            return {"completion": text,
                    "completion_tokens": tf.cast(ids.row_lengths(), tf.int32),
                    "stopped": stopped, "prompt_tokens_cut": cut}

        def nothing():  # an empty batch: the model is not called
            return {"completion": tf.zeros([0], tf.string), "completion_tokens": tf.zeros([0], tf.int32),
                    "stopped": tf.zeros([0], tf.bool), "prompt_tokens_cut": tf.zeros([0], tf.int32)}

        return tf.cond(tf.shape(texts)[0] > 0, run, nothing)

    def serve(self, prompt):
        return self._complete(tf.strings.join([self.prefix, prompt, self.suffix]))

    def generate_raw(self, prompt):
        return self._complete(prompt)

    def functions(self) -> dict:
        """The exported endpoints: name -> (function, input signature)."""
        string = [tf.TensorSpec([None], tf.string, name="prompt")]
        return {"serving_default": (self.serve, string), "generate_raw": (self.generate_raw, string)}


class Endpoints(TextEndpoints):
    """The graph functions of the export, over a (LoRA-merged) backbone and its tokenizer."""

    def __init__(self, loaded, config, prefix: str, suffix: str, sequence_length: int, model=None):
        super().__init__(loaded.causal_lm_class(backbone=loaded.backbone, preprocessor=None), loaded.tokenizer,
                         prefix, suffix)
        # Prompt tuning: the learned vectors are prefilled into the KV cache after the first token
        # (as in training and kft's evaluation), so each served step costs what the base model's does.
        self.prompt = prompt_lib.prompt_layer(model) if model is not None else None
        self.shift = self.prompt.num_tokens if self.prompt is not None else 0
        if self.prompt is not None:
            lm_model.check_prompt_generation(self.lm)
        self.model = model
        self.stop_ids = tf.constant(loaded.stop_ids, tf.int32)
        self.pad_id, self.eos_id = int(loaded.pad_id), int(loaded.eos_id)
        # encode() adds BOS unless the chat template writes it itself
        self.bos = [loaded.bos_id] if loaded.bos_id is not None and not (
            prefix and "bos_token" in (loaded.chat_template or "")) else []
        self.max_new_tokens = export_max_new_tokens(config)
        self.context = int(loaded.max_sequence_length)
        if self.context <= self.max_new_tokens + len(self.bos) + self.shift:
            raise ExportError(f"--export_max_new_tokens={self.max_new_tokens} leaves no room for a prompt in "
                              f"the backbone's {self.context} positions")
        self.pick = _pick(config)
        self.seed = int(config.seed)
        self.beams = int(config.export_num_beams) if config.export_sampler == "beam" else 0
        self.length_penalty = float(config.export_length_penalty)
        self.sequence_length = sequence_length

    def _prompt_ids(self, texts):
        """Ragged prompt ids ([bos] + tokens, cut from the start to leave room) and tokens cut."""
        pieces = self.tokenize(texts)
        room = self.context - self.max_new_tokens - len(self.bos) - self.shift
        lengths = tf.cast(pieces.row_lengths(), tf.int32)
        cut = tf.maximum(lengths - room, 0)
        starts = tf.cast(pieces.row_starts(), tf.int32) + cut
        kept = tf.RaggedTensor.from_row_lengths(
            tf.gather(pieces.values, tf.ragged.range(starts, starts + lengths - cut).values),
            tf.cast(lengths - cut, tf.int64))
        if self.bos:
            bos = tf.fill([kept.nrows(), 1], tf.constant(self.bos[0], tf.int32))
            kept = tf.concat([tf.RaggedTensor.from_tensor(bos), kept], axis=1)
        # A prompt of no tokens at all starts from the end-of-sequence token (a document boundary).
        empty = tf.equal(kept.row_lengths(), 0)
        kept = tf.concat([tf.RaggedTensor.from_row_lengths(
            tf.fill([tf.reduce_sum(tf.cast(empty, tf.int32))], tf.constant(self.eos_id, tf.int32)),
            tf.cast(empty, tf.int64)), kept], axis=1)
        return kept, cut

    def _generate(self, prompts: tf.RaggedTensor, max_new_tokens: int | None = None):
        """Completions of ragged prompt ids: (ragged ids, stopped [b])."""
        max_new_tokens = max_new_tokens or self.max_new_tokens
        lengths = tf.cast(prompts.row_lengths(), tf.int32)
        width = tf.reduce_max(lengths) + max_new_tokens
        ids = prompts.to_tensor(default_value=self.pad_id, shape=[None, None])
        ids = tf.pad(ids, [[0, 0], [0, width - tf.shape(ids)[1]]], constant_values=self.pad_id)
        ends = lengths + max_new_tokens
        # Prefill the prompt positions only, then widen the cache ([b, layers, 2, width, heads, dim])
        # for the new tokens: the prefill's cost is the prompt's, not the prompt's plus the cap's.
        longest = tf.reduce_max(lengths)
        if self.prompt is None:
            _, cache = self.lm._build_cache(ids[:, :longest])
        else:  # the cache holds the prompt vectors after position 0: real tokens sit `shift` further on
            cache = lm_model._prefill_with_prompt(self.lm, self.prompt, ids[:, :longest])
        cache = tf.pad(cache, [[0, 0], [0, 0], [0, 0], [0, width - longest], [0, 0], [0, 0]])
        shift = self.shift
        batch = tf.shape(ids)[0]
        stop = self.stop_ids
        positions = tf.range(width)[None, :]
        start = tf.reduce_min(lengths)
        if shift:  # a first prompt token comes before the learned vectors
            start = tf.maximum(start, 1)
        if self.beams and max_new_tokens > 1:
            ids, hit = self._beam(ids, cache, lengths, ends, start, width)
            return self._completion_ids(ids, lengths, ends), hit

        def body(t, ids, cache, done, hit):
            logits, _, cache = self.lm.call_with_cache(ids[:, t - 1:t], cache, t - 1 + shift)
            token = self.pick(tf.cast(logits[:, -1, :], tf.float32), tf.stack([self.seed, t]))
            free = (t >= lengths) & ~done
            ids = tf.where(free[:, None] & tf.equal(positions, t), token[:, None], ids)
            new_hit = free & tf.reduce_any(tf.equal(token[:, None], stop[None, :]), axis=1)
            return t + 1, ids, cache, done | new_hit | (free & (t + 1 >= ends)), hit | new_hit

        _, ids, _, _, hit = tf.while_loop(
            lambda t, ids, cache, done, hit: (t < width) & ~tf.reduce_all(done), body,
            [start, ids, cache, tf.zeros([batch], tf.bool), tf.zeros([batch], tf.bool)])
        return self._completion_ids(ids, lengths, ends), hit

    def _completion_ids(self, ids, lengths, ends):
        """The generated ids of each row, up to (not including) its first stop token."""
        positions = tf.range(tf.shape(ids)[1])[None, :]
        generated = (positions >= lengths[:, None]) & (positions < ends[:, None])
        is_stop = generated & tf.reduce_any(tf.equal(ids[:, :, None], self.stop_ids[None, None, :]), axis=-1)
        before_stop = tf.equal(tf.cumsum(tf.cast(is_stop, tf.int32), axis=1), 0)
        return tf.ragged.boolean_mask(ids, generated & before_stop)

    def _beam(self, ids, cache, lengths, ends, start, width):
        """Beam search over the prefilled cache: (ids [b, width] of each row's best beam, stopped [b]).

        Each row keeps `beams` hypotheses (rows r*beams .. r*beams+beams-1 of the widened batch, the
        prefill's cache copied to each). While a row is still inside its prompt its beams take the
        prompt's tokens; from its first free position on, its beams' candidates (beam score + log p of
        every word) compete for the beams' places, and the cache rows follow their hypotheses. A beam
        that has produced a stop token is finished: it stays, its score frozen, and extends only by
        padding. A row is done when all its beams are finished or at the length cap; its answer is the
        beam with the best log p / generated tokens ** --export_length_penalty.
        """
        k, shift, stop = self.beams, self.shift, self.stop_ids
        batch = tf.shape(ids)[0]
        ids = tf.repeat(ids, k, axis=0)
        cache = tf.repeat(cache, k, axis=0)
        positions = tf.range(width)[None, :]
        beam_range = tf.range(k)[None, :]
        rows = tf.range(batch)[:, None] * k
        # only beam 0 is live at the start: the k copies of one prompt must not fill the beam k times
        scores = tf.tile(tf.concat([[0.0], tf.fill([k - 1], float("-inf"))], 0)[None, :], [batch, 1])

        def body(t, ids, cache, scores, finished, generated, done):
            logits, _, cache = self.lm.call_with_cache(ids[:, t - 1:t], cache, t - 1 + shift)
            log_probs = tf.nn.log_softmax(tf.cast(logits[:, -1, :], tf.float32), axis=-1)
            words = tf.shape(log_probs)[-1]
            log_probs = tf.reshape(log_probs, [batch, k, words])
            # a finished beam's one continuation: padding, at no cost
            only_pad = tf.where(tf.equal(tf.range(words), self.pad_id), 0.0, float("-inf"))
            log_probs = tf.where(finished[:, :, None], only_pad[None, None, :], log_probs)
            candidates = tf.reshape(scores[:, :, None] + log_probs, [batch, k * words])
            best, index = tf.math.top_k(candidates, k=k)
            free = (t >= lengths) & ~done
            source = tf.where(free[:, None], index // words, beam_range)
            token = index % words
            scores = tf.where(free[:, None], best, scores)
            from_rows = tf.reshape(rows + source, [-1])
            ids = tf.gather(ids, from_rows)
            cache = tf.gather(cache, from_rows)
            was_finished = tf.gather(finished, source, batch_dims=1)
            generated = tf.gather(generated, source, batch_dims=1)
            write = tf.repeat(free, k)[:, None] & tf.equal(positions, t)
            ids = tf.where(write, tf.reshape(token, [-1])[:, None], ids)
            counted = free[:, None] & ~was_finished
            generated += tf.cast(counted, tf.int32)
            is_stop = tf.reduce_any(tf.equal(token[:, :, None], stop[None, None, :]), axis=-1)
            finished = was_finished | (counted & is_stop)
            done = done | (free & (tf.reduce_all(finished, axis=1) | (t + 1 >= ends)))
            return t + 1, ids, cache, scores, finished, generated, done

        zeros = tf.zeros([batch, k], tf.bool)
        _, ids, _, scores, finished, generated, _ = tf.while_loop(
            lambda t, ids, cache, scores, finished, generated, done: (t < width) & ~tf.reduce_all(done), body,
            [start, ids, cache, scores, zeros, tf.zeros([batch, k], tf.int32), tf.zeros([batch], tf.bool)])
        length = tf.cast(tf.maximum(generated, 1), tf.float32)
        chosen = tf.argmax(scores / length ** self.length_penalty, axis=1, output_type=tf.int32)
        ids = tf.gather(ids, tf.range(batch) * k + chosen)
        return ids, tf.gather(finished, chosen, batch_dims=1)

    def _completions(self, texts):
        prompts, cut = self._prompt_ids(texts)
        ids, stopped = self._generate(prompts)
        return ids, stopped, cut

    def first_token(self, prompt):
        """serving_default's first generated token only: its latency is the time to first token. (With
        beam search it is the likeliest first token: the beams choose their completion at the end.)"""
        texts = tf.strings.join([self.prefix, prompt, self.suffix])

        def run():
            prompts, cut = self._prompt_ids(texts)
            ids = self._generate(prompts, 1)[0]
            token = tf.cast(ids.to_tensor(default_value=-1, shape=[None, 1])[:, 0], tf.int32)
            return {"token_id": token, "token": self.detokenize(ids), "prompt_tokens_cut": cut}

        def nothing():
            return {"token_id": tf.zeros([0], tf.int32), "token": tf.zeros([0], tf.string),
                    "prompt_tokens_cut": tf.zeros([0], tf.int32)}

        return tf.cond(tf.shape(texts)[0] > 0, run, nothing)

    def token_ids(self, token_ids, padding_mask):
        short = tf.maximum(0, 1 - tf.shape(token_ids)[1])  # an empty request arrives as [b, 0]
        token_ids = tf.pad(token_ids, [[0, 0], [0, short]], constant_values=self.pad_id)
        padding_mask = tf.pad(padding_mask, [[0, 0], [0, short]])
        # a prompt-tuned model inserts its vectors and strips their positions from its output
        hidden = (self.model if self.prompt is not None else self.lm.backbone)(
            {"token_ids": token_ids, "padding_mask": padding_mask})
        logits = tf.cast(self.lm.backbone.token_embedding(hidden, reverse=True), tf.float32)
        log_probs = tf.nn.log_softmax(logits, axis=-1)
        following = tf.gather(log_probs[:, :-1], token_ids[:, 1:], batch_dims=2)
        real = tf.cast(padding_mask[:, 1:] > 0, tf.float32)
        token_log_probs = tf.pad(following * real, [[0, 0], [1, 0]])
        last = tf.maximum(tf.reduce_sum(tf.cast(padding_mask > 0, tf.int32), axis=1) - 1, 0)
        return {"token_log_probs": token_log_probs[:, :tf.shape(token_ids)[1] - short],
                "next_token_log_probs": tf.gather(log_probs, last, batch_dims=1)}


    def functions(self) -> dict:
        string = [tf.TensorSpec([None], tf.string, name="prompt")]
        ids = [tf.TensorSpec([None, None], tf.int32, name="token_ids"),
               tf.TensorSpec([None, None], tf.int32, name="padding_mask")]
        return {**super().functions(), "first_token": (self.first_token, string),
                "serve_token_ids": (self.token_ids, ids)}


def write_export(endpoints: TextEndpoints, config, texts: list[str], inputs: str, sequence_length: int,
                 generation: dict, metadata: dict, run_name: str, model: str = "") -> str:
    """Checks the graph tokenizer on `texts` (eval `inputs` as the model read them: the served ids
    must be training's), then writes the endpoints as a new version under --export_dir/<run_name>/,
    with the sampler and `generation` in the metadata."""
    from kft.models import savedmodel as export_lib

    graph_tokenize = tf.function(endpoints.tokenize, input_signature=[tf.TensorSpec([None], tf.string)])
    differ = graph_tokenizer.check(graph_tokenize, endpoints.tokenizer, texts)
    if differ:
        raise ExportError(f"the graph tokenizer gives other ids than training's for {len(differ)} of "
                          f"{len(texts)} eval {inputs} (first: {texts[differ[0]][:80]!r}); not exported")
    sampler = {"sampler": config.export_sampler}
    if config.export_sampler == "beam":
        sampler.update(num_beams=config.export_num_beams, length_penalty=config.export_length_penalty)
    elif config.export_sampler != "greedy":
        sampler.update(temperature=config.export_temperature, seed=config.seed,
                       **({"top_k": config.export_top_k} if config.export_sampler == "top_k"
                          else {"top_p": config.export_top_p}))
    metadata = {**metadata, "sequence_length": sequence_length, "generation": {
        **sampler, "max_new_tokens": endpoints.max_new_tokens, **generation, "tokenizer_checked_on": len(texts)}}
    tracked = [endpoints.bpe] if endpoints.bpe is not None else [endpoints.tokenizer]
    if getattr(endpoints, "prompt", None) is not None:
        tracked.append(endpoints.prompt)  # the prompt vectors: the one variable outside the backbone
    path = export_lib.write(endpoints.lm.backbone, tracked, endpoints.functions(), [], config.export_dir,
                            run_name, metadata)
    logging.info("exported the generating %sSavedModel (%s sampling, up to %d new tokens) to %s", model,
                 config.export_sampler, endpoints.max_new_tokens, path)
    return path


def export(loaded, config, prefix: str, suffix: str, described: str, sequence_length: int,
           check_texts: list[str], metadata: dict, run_name: str, model=None) -> str:
    """Writes the generating SavedModel as a new version under --export_dir/<run_name>/; `model`
    (the trained model) carries a prompt-tuned run's vectors."""
    endpoints = Endpoints.create(loaded, config, prefix, suffix, sequence_length, model)
    return write_export(endpoints, config, [prefix + t + suffix for t in check_texts], "prompts", sequence_length,
                        {"context_length": endpoints.context, "stop_ids": list(loaded.stop_ids),
                         "prompt_input": described, "prompt_prefix": prefix, "prompt_suffix": suffix,
                         "prompt_vectors": endpoints.shift},
                        metadata, run_name)
