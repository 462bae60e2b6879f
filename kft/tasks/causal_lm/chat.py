"""Chat templates: a checkpoint's jinja2 template rendered the way Hugging Face tokenizers render it.

The template text comes from the checkpoint's tokenizer_config.json (GGUF files carry it too). It
runs in jinja2's immutable sandbox (a template is code shipped with downloaded weights) with the
same environment options and helpers (`raise_exception`, `tojson`) as transformers' renderer, so a
prompt kft trains on is the prompt the model was tuned to read.
"""

from __future__ import annotations

import functools
import json

from kft.data.sources import DataError

ROLES = ("system", "user", "assistant")


class TemplateError(DataError):
    """The chat template refused the messages or failed; the message says which and why."""


@functools.lru_cache(maxsize=8)
def _compile(template: str):
    import jinja2
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def raise_exception(message):
        raise TemplateError(message)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                        extensions=["jinja2.ext.loopcontrols"])
    env.filters["tojson"] = lambda value, indent=None: json.dumps(value, ensure_ascii=False, indent=indent)
    env.globals["raise_exception"] = raise_exception
    try:
        return env.from_string(template)
    except jinja2.TemplateSyntaxError as e:
        raise TemplateError(f"the chat template does not parse: {e}") from None


def render(template: str, messages: list[dict], add_generation_prompt: bool,
           special_tokens: dict | None = None) -> str:
    """The prompt text for `messages` (ending with the assistant header when add_generation_prompt)."""
    try:
        return _compile(template).render(messages=messages, add_generation_prompt=add_generation_prompt,
                                         **(special_tokens or {}))
    except TemplateError:
        raise
    except Exception as e:  # jinja2's UndefinedError, SecurityError, TypeError from a template
        raise TemplateError(f"the chat template failed: {type(e).__name__}: {e}") from None


def plain(messages: list[dict]) -> str:
    """Without a chat template: the turns' contents joined by blank lines (the prompt as written)."""
    return "\n\n".join(m["content"] for m in messages)
