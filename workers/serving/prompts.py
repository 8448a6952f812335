"""A request's text -> token ids, bounded, with no request text parsed as a control token.

- Bounded before any encoding: a prompt (or a message's content, or a rendered conversation)
  longer than ``max_chars`` = the model's context x the longest token's characters can never
  fit, and is refused without being encoded (a 4 MB prompt was encoded, for seconds, before its
  400).
- Special tokens come from the chat template only. The tokenizer splits its special tokens
  (``<|endoftext|>``, turn markers) out of any text it encodes; text from a request is encoded
  with a copy of it that does not (``encode_special_tokens``), so ``<|endoftext|>`` typed in a
  prompt or a message is the characters it is made of. For chat, each special-token string in
  a message's content is swapped for a private-use character no message contains before the
  template renders; the rendered text is then split at the special tokens left (the
  template's own), the pieces between them encoded as plain text with the swapped strings put
  back, and the ids joined and post-processed as one encoding. Without special-token text in
  the messages this is exactly ``tokenizer.encode(rendered)`` (the tokenizer also encodes the
  pieces between special tokens separately).
- ``allow_special``: raw completion prompts may hold special tokens (off by default).

Every method may block for a while (encoding, a render in a worker process): the app calls
them from its preparation threads, never on the event loop.
"""

from __future__ import annotations

import re
from typing import Any

from workers.serving import protocol as oa

_PUA = 0xF0000  # Supplementary Private Use Area-A: placeholders for special-token text in messages


class PromptEncoder:
    def __init__(self, tokenizer, *, context: int, allow_special: bool = False, renderer=None):
        from tokenizers import Encoding, Tokenizer

        self._Encoding = Encoding
        self.tok = tokenizer
        self.plain = Tokenizer.from_str(tokenizer.to_str())
        self.plain.encode_special_tokens = True
        self.allow_special = allow_special
        self.renderer = renderer
        self.specials = sorted({t.content for t in tokenizer.get_added_tokens_decoder().values() if t.special},
                               key=len, reverse=True)
        self._split = re.compile("(" + "|".join(map(re.escape, self.specials)) + ")") if self.specials else None
        added = {t.content for t in tokenizer.get_added_tokens_decoder().values()}
        longest = max((len(t) for t in tokenizer.get_vocab(with_added_tokens=False) if t not in added), default=1)
        self.context = context
        self.max_chars = context * max(1, longest)
        """No text longer than this fits the context: no token covers more characters."""

    # -- limits, on the request as parsed (cheap: lengths only)

    def check_chars(self, text: str, param: str) -> None:
        if len(text) > self.max_chars:
            raise oa.APIError(f"{param} has {len(text)} characters; at most {self.max_chars} can fit this model's "
                              f"context of {self.context} tokens (no token is longer than "
                              f"{self.max_chars // self.context} characters). Shorten the {param}.", param=param,
                              code="context_length_exceeded")

    # -- encoding

    def text(self, text: str, *, param: str) -> list[int]:
        """A completion prompt's ids (special tokens parsed only when ``allow_special``)."""
        self.check_chars(text, param)
        return (self.tok if self.allow_special else self.plain).encode(text).ids

    def chat(self, messages: list[dict[str, Any]], template: str | None, *, add_generation_prompt: bool,
             eos_token: str) -> list[int]:
        """A conversation's ids: rendered (in a worker process), the template's special tokens
        the only control tokens."""
        from workers.data.chat import ChatTemplateError, message_text

        contents = []
        for i, m in enumerate(messages):
            try:
                text = message_text(m.get("content"))
            except ChatTemplateError as e:
                raise oa.APIError(str(e), param="messages") from None
            self.check_chars(text, f"messages[{i}].content")
            contents.append(text)
        swap, back = self._placeholders(contents)
        clean = [{**m, "content": self._defuse(c, swap)} for m, c in zip(messages, contents)]
        try:
            rendered = self.renderer.render(clean, template, add_generation_prompt=add_generation_prompt,
                                            eos_token=eos_token, max_chars=self.max_chars)
        except ChatTemplateError as e:
            raise oa.APIError(str(e), param="messages") from None
        except TimeoutError:
            raise oa.APIError("every chat-template worker is busy; retry later", status=503, type="server_error",
                              code="overloaded", headers={"Retry-After": "1"}) from None
        return self._encode_rendered(rendered, back)

    def _placeholders(self, contents: list[str]) -> tuple[dict[str, str], dict[str, str]]:
        """special string -> a private-use character in no message, and back."""
        if not self.specials or not any(s in c for c in contents for s in self.specials):
            return {}, {}
        used = set().union(*map(set, contents))
        free = (chr(c) for c in range(_PUA, _PUA + 0x1FFFE) if chr(c) not in used)
        swap = {s: next(free) for s in self.specials}
        return swap, {v: k for k, v in swap.items()}

    def _defuse(self, text: str, swap: dict[str, str]) -> str:
        for s, ch in swap.items():  # longest first: a special containing another is swapped whole
            text = text.replace(s, ch)
        return text

    def _encode_rendered(self, rendered: str, back: dict[str, str]) -> list[int]:
        if self._split is None:
            return self.tok.encode(rendered).ids
        restore = re.compile("|".join(map(re.escape, back))) if back else None
        parts = []
        for i, piece in enumerate(self._split.split(rendered)):
            if not piece:
                continue
            if i % 2:  # a special token of the template's
                parts.append(self.tok.encode(piece, add_special_tokens=False))
            else:
                if restore is not None:
                    piece = restore.sub(lambda m: back[m.group(0)], piece)
                parts.append(self.plain.encode(piece, add_special_tokens=False))
        if not parts:
            return self.tok.encode("").ids
        merged = self._Encoding.merge(parts, growing_offsets=True)
        return self.tok.post_process(merged).ids


__all__ = ["PromptEncoder"]
