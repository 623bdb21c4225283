"""Incremental detokenization with stop strings, on the tokenizers library's streaming decoder."""

from __future__ import annotations

from tokenizers import Tokenizer
from tokenizers.decoders import DecodeStream

# Prompt tokens decoded ahead of the output, so its first token gets the right leading space (as vLLM).
PROMPT_CONTEXT = 4


class Detokenizer:
    """The text of one request's output so far; finds the first stop string and cuts the text before it."""

    __slots__ = ("_stream", "_tokenizer", "stop", "text")

    def __init__(self, tokenizer: Tokenizer, prompt_token_ids: list[int], stop: list[str] | None) -> None:
        self._tokenizer = tokenizer
        self._stream = DecodeStream(skip_special_tokens=True)
        for tok in prompt_token_ids[-PROMPT_CONTEXT:]:
            self._stream.step(tokenizer, tok)
        self.stop = stop or []
        self.text = ""

    def append(self, token_ids: list[int]) -> str | None:
        """Decode new tokens; returns the stop string they completed, if any (the text ends before it)."""
        old_len = len(self.text)
        for tok in token_ids:
            self.text += self._stream.step(self._tokenizer, tok) or ""
        for s in self.stop:
            # Only a match that ends in the new text is new; search from where one could start.
            i = self.text.find(s, max(0, old_len - len(s) + 1))
            if i >= 0:
                self.text = self.text[:i]
                return s
        return None
