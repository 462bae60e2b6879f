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
"""

from __future__ import annotations

import keras
import tensorflow as tf
from absl import logging

from kft.tasks.causal_lm import chat, data as data_lib, graph_tokenizer

_SENTINEL = "\ue001kft-prompt\ue001"


class ExportError(ValueError):
    """The run cannot be served as a generating SavedModel; the message says why."""


def prompt_affixes(config, loaded, template: str | None, train: data_lib.Split) -> tuple[str, str, str]:
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


def _pick(config):
    """The token chooser of --export_sampler: fn(logits [b, v] float32, step seed) -> ids [b]."""
    if config.export_sampler == "greedy":
        return lambda logits, seed: tf.argmax(logits, axis=-1, output_type=tf.int32)
    temperature = float(config.export_temperature)
    if temperature <= 0:
        raise ExportError(f"--export_temperature={temperature}: must be positive")

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

    def __init__(self, loaded, config, prefix: str, suffix: str, sequence_length: int):
        super().__init__(loaded.causal_lm_class(backbone=loaded.backbone, preprocessor=None), loaded.tokenizer,
                         prefix, suffix)
        self.stop_ids = tf.constant(loaded.stop_ids, tf.int32)
        self.pad_id, self.eos_id = int(loaded.pad_id), int(loaded.eos_id)
        # encode() adds BOS unless the chat template writes it itself
        self.bos = [loaded.bos_id] if loaded.bos_id is not None and not (
            prefix and "bos_token" in (loaded.chat_template or "")) else []
        self.max_new_tokens = export_max_new_tokens(config)
        self.context = int(loaded.max_sequence_length)
        if self.context <= self.max_new_tokens + len(self.bos):
            raise ExportError(f"--export_max_new_tokens={self.max_new_tokens} leaves no room for a prompt in "
                              f"the backbone's {self.context} positions")
        self.pick = _pick(config)
        self.seed = int(config.seed)
        self.sequence_length = sequence_length

    def _prompt_ids(self, texts):
        """Ragged prompt ids ([bos] + tokens, cut from the start to leave room) and tokens cut."""
        pieces = self.tokenize(texts)
        room = self.context - self.max_new_tokens - len(self.bos)
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
        _, cache = self.lm._build_cache(ids[:, :longest])
        cache = tf.pad(cache, [[0, 0], [0, 0], [0, 0], [0, width - longest], [0, 0], [0, 0]])
        batch = tf.shape(ids)[0]
        stop = self.stop_ids
        positions = tf.range(width)[None, :]

        def body(t, ids, cache, done, hit):
            logits, _, cache = self.lm.call_with_cache(ids[:, t - 1:t], cache, t - 1)
            token = self.pick(tf.cast(logits[:, -1, :], tf.float32), tf.stack([self.seed, t]))
            free = (t >= lengths) & ~done
            ids = tf.where(free[:, None] & tf.equal(positions, t), token[:, None], ids)
            new_hit = free & tf.reduce_any(tf.equal(token[:, None], stop[None, :]), axis=1)
            return t + 1, ids, cache, done | new_hit | (free & (t + 1 >= ends)), hit | new_hit

        start = tf.reduce_min(lengths)
        _, ids, _, _, hit = tf.while_loop(
            lambda t, ids, cache, done, hit: (t < width) & ~tf.reduce_all(done), body,
            [start, ids, cache, tf.zeros([batch], tf.bool), tf.zeros([batch], tf.bool)])
        generated = (positions >= lengths[:, None]) & (positions < ends[:, None])
        is_stop = generated & tf.reduce_any(tf.equal(ids[:, :, None], stop[None, None, :]), axis=-1)
        # up to (not including) the first stop token
        before_stop = tf.equal(tf.cumsum(tf.cast(is_stop, tf.int32), axis=1), 0)
        keep = generated & before_stop
        return tf.ragged.boolean_mask(ids, keep), hit

    def _completions(self, texts):
        prompts, cut = self._prompt_ids(texts)
        ids, stopped = self._generate(prompts)
        return ids, stopped, cut

    def first_token(self, prompt):
        """serving_default's first generated token only: its latency is the time to first token."""
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
        hidden = self.lm.backbone({"token_ids": token_ids, "padding_mask": padding_mask})
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
    from kft import export as export_lib

    graph_tokenize = tf.function(endpoints.tokenize, input_signature=[tf.TensorSpec([None], tf.string)])
    differ = graph_tokenizer.check(graph_tokenize, endpoints.tokenizer, texts)
    if differ:
        raise ExportError(f"the graph tokenizer gives other ids than training's for {len(differ)} of "
                          f"{len(texts)} eval {inputs} (first: {texts[differ[0]][:80]!r}); not exported")
    sampler = {"sampler": config.export_sampler}
    if config.export_sampler != "greedy":
        sampler.update(temperature=config.export_temperature, seed=config.seed,
                       **({"top_k": config.export_top_k} if config.export_sampler == "top_k"
                          else {"top_p": config.export_top_p}))
    metadata = {**metadata, "sequence_length": sequence_length, "generation": {
        **sampler, "max_new_tokens": endpoints.max_new_tokens, **generation, "tokenizer_checked_on": len(texts)}}
    tracked = [endpoints.bpe] if endpoints.bpe is not None else [endpoints.tokenizer]
    path = export_lib.write(endpoints.lm.backbone, tracked, endpoints.functions(), [], config.export_dir,
                            run_name, metadata)
    logging.info("exported the generating %sSavedModel (%s sampling, up to %d new tokens) to %s", model,
                 config.export_sampler, endpoints.max_new_tokens, path)
    return path


def export(loaded, config, prefix: str, suffix: str, described: str, sequence_length: int,
           check_texts: list[str], metadata: dict, run_name: str) -> str:
    """Writes the generating SavedModel as a new version under --export_dir/<run_name>/."""
    endpoints = Endpoints.create(loaded, config, prefix, suffix, sequence_length)
    return write_export(endpoints, config, [prefix + t + suffix for t in check_texts], "prompts", sequence_length,
                        {"context_length": endpoints.context, "stop_ids": list(loaded.stop_ids),
                         "prompt_input": described, "prompt_prefix": prefix, "prompt_suffix": suffix},
                        metadata, run_name)
