"""Chat templates: turn OpenAI-style ``messages`` into the one prompt string a model was trained on.

A checkpoint's ``config.json`` may carry ``chat_template``: a Jinja2 template in the Hugging Face
convention (variables ``messages``, ``add_generation_prompt``, ``bos_token``, ``eos_token``;
``raise_exception(msg)`` to reject a conversation). Without one, ``DEFAULT_CHAT_TEMPLATE`` is used.
Templates run in Jinja2's immutable sandbox, since they come from checkpoint files.
"""

from __future__ import annotations

from functools import lru_cache
from typing import Any

DEFAULT_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "<|{{ message['role'] }}|>\n{{ message['content'] }}\n"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)
"""Role-tagged turns, one per line block; ends with the assistant tag for the model to continue."""

ROLES = ("system", "user", "assistant", "developer", "tool")


class ChatTemplateError(ValueError):
    """The conversation cannot be rendered (bad messages, or the template rejected it)."""


def _raise(message: str) -> None:
    raise ChatTemplateError(message)


@lru_cache(maxsize=16)
def _compile(template: str):
    from jinja2 import TemplateError
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    # trim_blocks/lstrip_blocks: the settings transformers renders HF chat templates with.
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
    env.globals["raise_exception"] = _raise
    try:
        return env.from_string(template)
    except TemplateError as e:
        raise ChatTemplateError(f"chat_template does not parse: {e}") from e


def message_text(content: Any) -> str:
    """The text of a message's ``content``: a string, or OpenAI's list of ``{"type": "text"}`` parts."""
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        parts = []
        for part in content:
            if not isinstance(part, dict) or part.get("type") != "text":
                kind = part.get("type") if isinstance(part, dict) else type(part).__name__
                raise ChatTemplateError(f"message content part of type {kind!r} is not supported; only 'text' parts are")
            parts.append(str(part.get("text", "")))
        return "".join(parts)
    raise ChatTemplateError(f"message content must be a string or a list of text parts, got {type(content).__name__}")


def render_chat(
    messages: list[dict[str, Any]],
    template: str | None = None,
    *,
    add_generation_prompt: bool = True,
    bos_token: str = "",
    eos_token: str = "",
    max_chars: int | None = None,
) -> str:
    """The prompt for ``messages`` (dicts with ``role`` and ``content``) under ``template``.
    ``max_chars``: stop rendering, with a ChatTemplateError, once the output passes it."""
    if not messages:
        raise ChatTemplateError("messages must hold at least one message")
    clean = []
    for i, m in enumerate(messages):
        role = m.get("role")
        if role not in ROLES:
            raise ChatTemplateError(f"messages[{i}].role is {role!r}; allowed: {', '.join(ROLES)}")
        clean.append({"role": role, "content": message_text(m.get("content"))})
    from jinja2 import TemplateError

    try:
        parts, size = [], 0
        for part in _compile(template or DEFAULT_CHAT_TEMPLATE).generate(
                messages=clean, add_generation_prompt=add_generation_prompt, bos_token=bos_token, eos_token=eos_token):
            size += len(part)
            if max_chars is not None and size > max_chars:
                raise ChatTemplateError(f"the rendered conversation passes {max_chars} characters, more than "
                                        "the model's context can hold")
            parts.append(part)
        return "".join(parts)
    except ChatTemplateError:
        raise
    except TemplateError as e:
        raise ChatTemplateError(f"chat_template failed to render: {e}") from e


__all__ = ["DEFAULT_CHAT_TEMPLATE", "ChatTemplateError", "message_text", "render_chat"]
