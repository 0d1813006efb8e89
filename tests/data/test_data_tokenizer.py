"""Tokenizers: exact round trips on real stdlib code, fixed special ids, files and bad specs."""

from __future__ import annotations

import sysconfig
from pathlib import Path

import pytest
from tokenizers import Tokenizer, models

from ft_ray.data import letters
from ft_ray.data import tokenizer as tk
from ft_ray.data.errors import DataError

STDLIB = Path(sysconfig.get_paths()["stdlib"])
TRAIN_FILES = sorted((STDLIB / "email").glob("*.py"))  # ~20 real files, ~0.5 MB
HELD_OUT_FILES = sorted((STDLIB / "json").glob("*.py"))
TRICKY = "naïve café 日本語 🙂\r\n\ttabs  and   spaces \x00 <eos> <bos></s>\n\n  "


def read(path: Path) -> str:
    return path.read_text(encoding="utf-8", errors="replace")


def round_trips(tok: Tokenizer, text: str) -> bool:
    return tok.decode(tk.encode_batch(tok, [text])[0]) == text


@pytest.fixture(scope="module")
def bpe() -> Tokenizer:
    return tk.train_bpe((read(p) for p in TRAIN_FILES), 400)


def test_stdlib_sample_is_real():
    assert len(TRAIN_FILES) >= 15 and len(HELD_OUT_FILES) >= 3


def test_byte_tokenizer_round_trips_stdlib_and_tricky_text():
    tok = tk.byte_tokenizer()
    assert tk.vocab_size(tok) == 259
    assert [tok.token_to_id(s) for s in tk.SPECIAL_TOKENS] == [0, 1, 2]
    for path in TRAIN_FILES + HELD_OUT_FILES:
        assert round_trips(tok, read(path)), path
    assert round_trips(tok, TRICKY)
    assert round_trips(tok, "")
    # ids are 3 + byte value, one per UTF-8 byte
    assert tk.encode_batch(tok, ["Aé"])[0] == [3 + 65, 3 + 0xC3, 3 + 0xA9]


def test_special_spellings_in_text_stay_text():
    tok = tk.byte_tokenizer()
    ids = tk.encode_batch(tok, ["<eos>"])[0]
    assert ids == [3 + b for b in b"<eos>"] and tk.eos_id(tok) not in ids


def test_bpe_round_trips_and_compresses(bpe):
    assert tk.vocab_size(bpe) == 400
    assert [bpe.token_to_id(s) for s in tk.SPECIAL_TOKENS] == [0, 1, 2]
    for path in TRAIN_FILES + HELD_OUT_FILES:  # held-out files: merges generalise, bytes cover all
        assert round_trips(bpe, read(path)), path
    assert round_trips(bpe, TRICKY)
    text = read(HELD_OUT_FILES[0])
    assert len(tk.encode_batch(bpe, [text])[0]) < 0.8 * len(text.encode())


def test_bpe_vocab_too_small():
    with pytest.raises(DataError, match="bpe:100.*>= 259"):
        tk.train_bpe(["abc"], 100)


def test_letter_tokenizer_matches_letters_ids(tmp_path):
    tok = tk.letter_tokenizer()
    assert tok.get_vocab(with_added_tokens=True) == letters.CHAR_TO_ID
    text = "Q>__!QQQQQQQQ____" + "ab"
    assert tok.encode(text).ids == letters.encode(text)
    tok.save(str(tmp_path / "tokenizer.json"))
    loaded = Tokenizer.from_file(str(tmp_path / "tokenizer.json"))
    ids = [letters.BOS_ID, *letters.encode(text), letters.EOS_ID]
    assert loaded.decode(ids) == text
    assert (tk.bos_id(loaded), tk.eos_id(loaded), tk.pad_id(loaded)) == (1, 2, 0)


def test_load_tokenizer_specs(tmp_path, bpe):
    assert tk.vocab_size(tk.load_tokenizer("bytes")) == 259
    trained = tk.load_tokenizer("bpe:300", lambda: (read(p) for p in HELD_OUT_FILES))
    assert tk.vocab_size(trained) == 300
    bpe.save(str(tmp_path / "tokenizer.json"))
    text = read(HELD_OUT_FILES[0])
    for spec in (str(tmp_path / "tokenizer.json"), str(tmp_path)):  # the file or its directory
        loaded = tk.load_tokenizer(spec)
        assert round_trips(loaded, text) and tk.vocab_size(loaded) == 400


def test_foreign_tokenizer_roles(tmp_path):
    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, "a": 3}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    assert (tk.bos_id(tok), tk.eos_id(tok), tk.pad_id(tok)) == (1, 2, None)
    no_eos = Tokenizer(models.WordLevel(vocab={"<unk>": 0, "a": 1}, unk_token="<unk>"))
    no_eos.save(str(tmp_path / "no_eos.json"))
    with pytest.raises(DataError, match=r"no_eos\.json: no end-of-sequence token"):
        tk.load_tokenizer(str(tmp_path / "no_eos.json"))


@pytest.mark.parametrize("spec, message", [
    ("wordpiece", r"unknown tokenizer 'wordpiece': expected 'bytes', 'bpe:<vocab size>'"),
    ("bpe:many", r"tokenizer 'bpe:many': expected bpe:<vocab size>"),
    ("bpe:500", r"must be trained on a corpus"),
    ("/nonexistent/tok.json", r"tokenizer file not found: /nonexistent/tok\.json"),
])
def test_bad_tokenizer_specs(spec, message):
    with pytest.raises(DataError, match=message):
        tk.load_tokenizer(spec)


def test_corrupt_tokenizer_file(tmp_path):
    path = tmp_path / "tokenizer.json"
    path.write_text('{"version": "1.0", "model": 42}')
    with pytest.raises(DataError, match=r"tokenizer\.json: not a valid tokenizer\.json"):
        tk.load_tokenizer(str(path))
