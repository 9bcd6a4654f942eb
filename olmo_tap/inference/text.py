"""Incremental detokenisation: text pieces that always join up to the decoded whole.

Decoding tokens one by one breaks characters spread over several tokens (an
emoji, a CJK character in byte-level BPE) and drops leading spaces some
tokenizers attach to word starts. Instead we decode the whole emitted sequence
and hand out only what was added since the last piece, holding text back
while it ends in an incomplete character (U+FFFD).
"""

from __future__ import annotations

from typing import Any


class TextStream:
    def __init__(self, tokenizer: Any, skip_special_tokens: bool = True) -> None:
        self.tokenizer = tokenizer
        self.skip_special_tokens = skip_special_tokens
        self.ids: list[int] = []
        self.text = ""  # text handed out so far

    def push(self, token_id: int) -> str:
        """Add one token; return the newly completed text (possibly empty)."""
        self.ids.append(int(token_id))
        full = self.tokenizer.decode(self.ids, skip_special_tokens=self.skip_special_tokens)
        if full.endswith("\ufffd") or not full.startswith(self.text):
            return ""  # an unfinished multi-byte character: wait for the next token
        piece, self.text = full[len(self.text) :], full
        return piece

    def flush(self) -> str:
        """Whatever is still held back at the end of the sequence."""
        full = self.tokenizer.decode(self.ids, skip_special_tokens=self.skip_special_tokens)
        piece = full[len(self.text) :] if full.startswith(self.text) else ""
        self.text = full if piece or full.startswith(self.text) else self.text
        return piece
