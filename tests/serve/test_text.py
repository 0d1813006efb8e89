"""A sample's text as it grows: incremental decoding against decoding the whole list each time."""

from __future__ import annotations

import functools
import random

import pytest
from tokenizers import Tokenizer, decoders, models, pre_tokenizers

from ft_ray.data import tokenizer as tk
from ft_ray.serve.text import REPLACEMENT, IncrementalDecoder, find_stop

TEXT = "Plans: naïve café, 東京, emoji 🙂🚀, math ∑x², done.\n" * 3


def _check_growth(tok: Tokenizer, ids: list[int], one_byte_tokens: bool = False) -> None:
    """At every length, the incremental text is the whole decoding when that ends in a whole
    character, else a prefix of it (a token holding the first bytes of a character waits for the
    rest); with one byte per token, exactly the whole decoding without its incomplete end."""
    decode = functools.partial(tok.decode, skip_special_tokens=True)
    inc = IncrementalDecoder(decode)
    for n in range(1, len(ids) + 1):
        text, whole = inc.extend(ids[:n]), decode(ids[:n])
        if one_byte_tokens or not whole.endswith(REPLACEMENT):
            assert text == whole.rstrip(REPLACEMENT), n
        else:
            assert whole.startswith(text), n


def test_byte_tokenizer_text_grows_like_the_whole_decoding_even_through_invalid_bytes():
    tok = tk.byte_tokenizer()
    _check_growth(tok, tok.encode(TEXT).ids, one_byte_tokens=True)
    rng = random.Random(0)  # split characters, lone continuation bytes, truncated sequences, EOS
    ids = [rng.choice([3 + rng.randrange(256), 3 + rng.randrange(0x80, 0x100), tk.eos_id(tok)])
           for _ in range(400)]
    _check_growth(tok, ids, one_byte_tokens=True)


def test_bpe_and_character_tokenizers_grow_like_the_whole_decoding():
    bpe = tk.train_bpe([TEXT] * 20, 300)
    _check_growth(bpe, bpe.encode(TEXT).ids)
    letters = tk.letter_tokenizer()
    _check_growth(letters, letters.encode("ABCDAB>CD").ids)


def test_a_decoder_with_a_leading_space_rule_keeps_its_spaces():
    """Metaspace (SentencePiece) drops the space of the text's first word only: decoding a window
    alone would drop every window's; the window's context keeps them."""
    vocab = {w: i for i, w in enumerate(["▁the", "▁plan", "▁is", "▁set", "s", "."])}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.Metaspace()
    tok.decoder = decoders.Metaspace()
    ids = [0, 1, 4, 2, 3, 5]
    assert tok.decode(ids) == "the plans is set."
    _check_growth(tok, ids)


@pytest.mark.parametrize("text, start, expected", [
    ("abcSTOPdef", 0, 3), ("abcSTOPdef", 3, 3), ("abcSTOPdef", 4, None), ("xxENDyySTOP", 0, 2),
])
def test_find_stop_from_an_offset(text, start, expected):
    assert find_stop(text, ["STOP", "END"], start) == expected


def _row(decode, stops: list[str], max_tokens: int, eos: int):
    import torch

    from ft_ray.serve.requests import GenerationRequest
    from ft_ray.serve.sequence import Sequence

    req = GenerationRequest("x", max_tokens=max_tokens, stop=stops)
    return Sequence(req, [5], 0, [0], [], decode, eos, torch.device("cpu")).rows[0]


def _whole_each_step(decode, ids: list[int], stops: list[str], max_tokens: int, eos: int):
    """The reference: decode the whole list at every token, stop at the first stop string."""
    for n in range(1, len(ids) + 1):
        if ids[n - 1] == eos:
            return n, decode(ids[:n - 1]), "stop"
        text = decode(ids[:n])
        if (cut := find_stop(text, stops)) is not None:
            return n, text[:cut], "stop"
        if n >= max_tokens:
            return n, text, "length"
    return None


def test_rows_stop_where_decoding_the_whole_list_each_step_stops():
    """Random tokens of a BPE and the byte tokenizer (split characters, invalid bytes, EOS), stop
    strings drawn from their own text: a row ends at the same token, with the same text and reason,
    as the reference; its streamed deltas concatenate to that text."""
    rng = random.Random(1)
    for tok in (tk.train_bpe([TEXT] * 20, 300), tk.byte_tokenizer()):
        decode, eos = functools.partial(tok.decode, skip_special_tokens=True), tk.eos_id(tok)
        for _ in range(300):
            ids = [rng.randrange(tok.get_vocab_size()) for _ in range(12)]
            text = decode(ids)
            i = rng.randrange(max(1, len(text)))
            stops = [text[i:i + rng.randint(1, 3)].strip(REPLACEMENT) or "@"]
            max_tokens = rng.randint(1, 12)
            ref = _whole_each_step(decode, ids, stops, max_tokens, eos)
            row, streamed, pushed = _row(decode, stops, max_tokens, eos), "", 0
            while not row.finished:
                streamed += row.push(ids[pushed])
                pushed += 1
            assert ref is not None and (pushed, row.text, row.finish_reason) == ref, (ids, stops, max_tokens)
            assert streamed == row.text


def test_a_stop_string_in_a_token_that_ends_mid_character_stops_the_row_at_that_token():
    """A token holding a stop string and the first byte of a character: the stop shows at once."""
    tok = Tokenizer(models.WordLevel(vocab={"<eos>": 0, "AB": 1, "STOP\u00c3": 2, "\u00a9": 3}, unk_token=None))
    tok.decoder = decoders.ByteLevel()  # "Ã" is byte 0xC3: a 2-byte character's first byte
    tok.add_special_tokens(["<eos>"])
    decode = functools.partial(tok.decode, skip_special_tokens=True)
    assert decode([1, 2]) == "ABSTOP" + REPLACEMENT
    row = _row(decode, ["STOP"], 8, 0)
    assert row.push(1) == "AB" and row.push(2) == ""
    assert (row.text, row.finish_reason) == ("AB", "stop")
