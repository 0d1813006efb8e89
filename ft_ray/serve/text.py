"""Text of one sample as it grows: stop strings, and how much of it is safe to stream.

A sample's text is its generated tokens decoded (special tokens skipped). Two things can still
change the end of that text when more tokens arrive, so a stream holds them back:
- an incomplete UTF-8 character: byte-level tokenizers emit one byte per token, and the decoder
  shows an incomplete character as U+FFFD until its last byte arrives;
- a tail that is the beginning of a stop string: if the stop string completes, the text is cut
  before it, and what was streamed could not be taken back.
Everything before those tails never changes (decoders of byte-level and character tokenizers are
prefix-stable), so streamed deltas concatenate to the final text.
"""

from __future__ import annotations

from collections.abc import Callable

REPLACEMENT = "\ufffd"  # what decoders show for bytes that are not (yet) a whole character


def find_stop(text: str, stops: list[str], start: int = 0) -> int | None:
    """Index where the earliest stop string starts in `text` at or after `start`, or None."""
    hits = [i for s in stops if (i := text.find(s, start)) >= 0]
    return min(hits) if hits else None


class IncrementalDecoder:
    """A growing list of token ids -> its text, decoding only a short window per token (vLLM's
    incremental detokenization), not the whole list: linear in the sample's length, not quadratic.

    The window is the tokens since the text last grew plus the ones that grew it last, so a decoder
    that reads a token in the context of the previous one (a leading-space rule) sees that context.
    The window moves on only when its decoding does not end in U+FFFD (a character still missing
    bytes); until then `extend` returns the text with the window's whole characters so far, as
    decoding the whole list would show them. The caller decodes the whole list once, at the end.
    """

    def __init__(self, decode: Callable[[list[int]], str]):
        self.decode, self.text = decode, ""
        self._prefix = self._read = 0  # token indices: window start, end of the text so far

    def extend(self, ids: list[int]) -> str:
        """`ids` is the previous list with tokens appended: its text, without an incomplete end."""
        old = self.decode(ids[self._prefix:self._read]) if self._read > self._prefix else ""
        new = self.decode(ids[self._prefix:])
        if len(new) > len(old) and not new.endswith(REPLACEMENT):
            self.text += new[len(old):]
            self._prefix, self._read = self._read, len(ids)
            return self.text
        return self.text + new[len(old):].rstrip(REPLACEMENT) if new.startswith(old) else self.text


def streamable_length(text: str, stops: list[str]) -> int:
    """How many leading characters of an unfinished sample's text can no longer change."""
    end = len(text)
    while end > 0 and text[end - 1] == REPLACEMENT:  # possibly a character still missing bytes
        end -= 1
    hold = 0
    for s in stops:  # the longest tail that could still grow into a stop string
        for k in range(min(len(s) - 1, end), hold, -1):
            if text.endswith(s[:k], 0, end):
                hold = k
                break
    return end - hold


def text_offsets(decode, ids: list[int], start: int = 0) -> list[int]:
    """Where each token's text starts in decode(ids), plus `start` (OpenAI's `text_offset`): the
    length of each prefix's decoding, an incomplete character at its end not counted."""
    return [start + len(decode(ids[:i]).rstrip(REPLACEMENT)) for i in range(len(ids))]
