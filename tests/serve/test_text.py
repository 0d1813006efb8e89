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


@pytest.mark.parametrize("end", ["eos", "length"])
def test_a_stop_string_in_a_token_that_ends_mid_character_is_cut_at_the_end(end):
    """A token holding a stop string and the first byte of a character leaves the incremental text
    behind; the whole decoding at the end (EOS or max_tokens) still finds the stop and cuts there."""
    import torch

    from ft_ray.serve.requests import GenerationRequest
    from ft_ray.serve.sequence import Sequence

    tok = Tokenizer(models.WordLevel(vocab={"<eos>": 0, "AB": 1, "STOP\u00c3": 2, "\u00a9": 3}, unk_token=None))
    tok.decoder = decoders.ByteLevel()  # "Ã" is byte 0xC3: a 2-byte character's first byte
    tok.add_special_tokens(["<eos>"])
    decode = functools.partial(tok.decode, skip_special_tokens=True)
    assert decode([1, 2]) == "ABSTOP" + REPLACEMENT
    req = GenerationRequest("x", max_tokens=2 if end == "length" else 8, stop=["STOP"])
    row = Sequence(req, [5], 0, [0], [], decode, 0, torch.device("cpu")).rows[0]
    assert row.push(1) == "AB" and row.push(2) == "" and (row.finish_reason is None) == (end == "eos")
    if end == "eos":
        assert row.push(0) == ""
    assert (row.text, row.finish_reason) == ("AB", "stop")
