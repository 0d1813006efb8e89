"""The paper's synthetic letter task (Fleuret 2025, Fig. 3-4) and an evaluator for its samples.

A sequence is `<bos>` + prompt `L>` + a 64-character body + `<eos>`. The body is `_` everywhere
except one letter L (uniform over A-Z) written 8 times from a uniform start; then every body
character (target included) becomes `!` with probability 1/16.
"""

from __future__ import annotations

import string
from dataclasses import dataclass

import numpy as np

BODY_LEN = 64
RUN_LEN = 8
NOISE_PROB = 1 / 16
LETTERS = string.ascii_uppercase
NUM_STARTS = BODY_LEN - RUN_LEN + 1  # 57 positions: log2(57) = 5.8 bits

# character vocabulary: special tokens first, then every character the task writes; lowercase
# letters (other synthetic tasks) are appended after them so the letter task's ids never change
SPECIALS = ["<pad>", "<bos>", "<eos>"]
CHARS = ["_", "!", ">"] + list(LETTERS) + list(string.ascii_lowercase)
VOCAB = SPECIALS + CHARS
PAD_ID, BOS_ID, EOS_ID = 0, 1, 2
CHAR_TO_ID = {c: i for i, c in enumerate(VOCAB)}
SEQ_TOKENS = 1 + 2 + BODY_LEN + 1  # bos, prompt, body, eos = 68
PROMPT_TOKENS = 3  # bos, letter, '>'


def make_bodies(num: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Draw `num` sequences. Returns (letters (num,) int, starts (num,) int, text (num, 66) uint8
    of ASCII codes: prompt + body)."""
    letters = rng.integers(0, 26, size=num)
    starts = rng.integers(0, NUM_STARTS, size=num)
    body = np.full((num, BODY_LEN), ord("_"), dtype=np.uint8)
    cols = starts[:, None] + np.arange(RUN_LEN)[None, :]
    body[np.arange(num)[:, None], cols] = (ord("A") + letters)[:, None]
    noise = rng.random((num, BODY_LEN)) < NOISE_PROB
    body[noise] = ord("!")
    prompt = np.stack([ord("A") + letters, np.full(num, ord(">"))], axis=1).astype(np.uint8)
    return letters, starts, np.concatenate([prompt, body], axis=1)


_ASCII_TO_ID = np.zeros(256, dtype=np.int64)
for _c, _i in CHAR_TO_ID.items():
    if len(_c) == 1:
        _ASCII_TO_ID[ord(_c)] = _i


def encode_texts(text: np.ndarray) -> np.ndarray:
    """(num, 66) ASCII -> (num, 68) token ids with BOS/EOS."""
    ids = _ASCII_TO_ID[text]
    num = ids.shape[0]
    return np.concatenate([np.full((num, 1), BOS_ID), ids, np.full((num, 1), EOS_ID)], axis=1)


def letter_sequences(num: int, seed: int) -> np.ndarray:
    """`num` token sequences (num, 68) int64, deterministic in `seed`."""
    return encode_texts(make_bodies(num, np.random.default_rng(seed))[2])


def encode(text: str) -> list[int]:
    return [CHAR_TO_ID[c] for c in text]


def decode(ids) -> str:
    """Token ids -> characters (special tokens dropped)."""
    return "".join(VOCAB[i] for i in ids if i >= len(SPECIALS) and i < len(VOCAB))


def prompt_ids(letter: str) -> list[int]:
    return [BOS_ID, CHAR_TO_ID[letter], CHAR_TO_ID[">"]]


@dataclass
class SampleCheck:
    valid: bool  # a body of 64 chars, one run of 8 of the prompt letter ('!' allowed inside), else '_' or '!'
    start: int | None  # position of the run's first letter in the body (None if not found)
    noise: tuple[int, ...]  # positions of '!' in the body


def check_body(body: str, letter: str) -> SampleCheck:
    """Evaluate one generated body (the 64 characters after the prompt) against the task's rules."""
    noise = tuple(i for i, c in enumerate(body) if c == "!")
    pos = [i for i, c in enumerate(body) if c == letter]
    start = pos[0] if pos else None
    ok = len(body) == BODY_LEN and bool(pos) and all(c in "_!" or c == letter for c in body)
    if ok:
        # some window of 8 must hold every letter and only letters or '!'
        ok = any(
            s <= pos[0] and pos[-1] < s + RUN_LEN and all(body[j] in (letter, "!") for j in range(s, s + RUN_LEN))
            for s in range(max(0, pos[-1] - RUN_LEN + 1), min(pos[0], NUM_STARTS - 1) + 1)
        )
    return SampleCheck(valid=ok, start=start, noise=noise)
