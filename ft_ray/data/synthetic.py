"""Synthetic tasks that probe latent plans, each a deterministic function of (num, seed).

- `letters`: the paper's task (letters.py): a letter run at a uniform start in noisy `_`.
- `arith`: multi-step arithmetic in words (arith.py), held-out problems split off by a hash; the
  evaluation suite (ft_ray/eval/tasks) scores those.
- `modes`: a global choice made early that shows late. A hidden mode m in {0..3} is drawn before
  the first body token, but the body's first 48 characters (noisy `_`) say nothing about it; only
  the last 16 characters spell the mode's pattern. A decoder without a plan must hedge over the
  four patterns until the first pattern characters appear; a Free Transformer can put m in Z.

`letters` and `modes` write `<bos>` + a 2-character prompt + a 64-character body + `<eos>` = 68
tokens; `arith` packs its documents into 68-token rows. All use letters.py's vocabulary, so one
character tokenizer serves every task.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from ft_ray.data import arith, letters
from ft_ray.data.errors import DataError
from ft_ray.seeds import derive_seed

MODE_PATTERNS = ("ab" * 8, "aabb" * 4, "abcd" * 4, "aaaabbbb" * 2)  # mode m writes pattern m
NUM_MODES = len(MODE_PATTERNS)
PATTERN_LEN = 16
FILLER_LEN = letters.BODY_LEN - PATTERN_LEN  # 48 noisy '_' before the pattern
MODES_PROMPT = "M>"


def make_mode_bodies(num: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Draw `num` sequences. Returns (modes (num,) int, text (num, 66) uint8 ASCII: prompt + body).

    Noise ('!' with probability 1/16) hits only the filler: the pattern stays exact, so the
    mode is always recoverable from the body's end.
    """
    modes = rng.integers(0, NUM_MODES, size=num)
    filler = np.full((num, FILLER_LEN), ord("_"), dtype=np.uint8)
    filler[rng.random((num, FILLER_LEN)) < letters.NOISE_PROB] = ord("!")
    patterns = np.array([[ord(c) for c in p] for p in MODE_PATTERNS], dtype=np.uint8)
    prompt = np.frombuffer(MODES_PROMPT.encode(), dtype=np.uint8)
    text = np.concatenate([np.broadcast_to(prompt, (num, 2)), filler, patterns[modes]], axis=1)
    return modes, text


def mode_sequences(num: int, seed: int) -> np.ndarray:
    """`num` token sequences (num, 68) int64, deterministic in `seed`."""
    return letters.encode_texts(make_mode_bodies(num, np.random.default_rng(seed))[1])


def check_modes_body(body: str) -> int | None:
    """The mode a generated body (64 chars after the prompt) expresses, or None if invalid."""
    if len(body) != letters.BODY_LEN or any(c not in "_!" for c in body[:FILLER_LEN]):
        return None
    tail = body[FILLER_LEN:]
    return MODE_PATTERNS.index(tail) if tail in MODE_PATTERNS else None


@dataclass(frozen=True)
class Task:
    generate: Callable[[int, int], np.ndarray]  # (num, seed) -> (num, seq_tokens) int64 ids
    seq_tokens: int  # tokens per sequence, BOS and EOS included
    prompt_tokens: int  # BOS + prompt: what generation is conditioned on


TASKS: dict[str, Task] = {
    "letters": Task(letters.letter_sequences, letters.SEQ_TOKENS, letters.PROMPT_TOKENS),
    "modes": Task(mode_sequences, letters.SEQ_TOKENS, letters.PROMPT_TOKENS),
    "arith": Task(arith.arith_sequences, arith.SEQ_TOKENS, arith.PROMPT_TOKENS),
}


def get_task(name: str) -> Task:
    if name not in TASKS:
        raise DataError(f"unknown synthetic task {name!r}: expected one of {', '.join(TASKS)}")
    return TASKS[name]


def generate(task: str, num: int, seed: int) -> np.ndarray:
    """`num` sequences of `task` as token ids (num, seq_tokens) int64, deterministic in `seed`."""
    return get_task(task).generate(num, seed)


ROWS_PER_CHUNK = 256  # rows generated together from one derived seed


def synthetic_rows(task: str, seed: int, split: str, row_ids) -> np.ndarray:
    """Rows `row_ids` of a synthetic split: (n, seq_tokens), the smallest integer type that fits.

    Row i is row i % 256 of chunk i // 256, generated from `derive_seed(seed, split, chunk)`: the
    rows depend only on (task, seed, split, id), never on how they are batched, how many workers
    read them, or whether they are generated on the fly (`data.source: synthetic`) or written as
    shards (`ft-ray data synthetic`): both give the same rows for the same seed.
    """
    gen = get_task(task).generate
    row_ids = np.asarray(row_ids, dtype=np.int64)
    chunks, inverse = np.unique(row_ids // ROWS_PER_CHUNK, return_inverse=True)
    out = None
    for j, chunk in enumerate(chunks):
        rows = gen(ROWS_PER_CHUNK, derive_seed(seed, split, int(chunk)))
        if out is None:
            out = np.empty((len(row_ids), rows.shape[1]), dtype=np.uint8 if len(letters.VOCAB) <= 256 else np.int32)
        mask = inverse == j
        out[mask] = rows[row_ids[mask] % ROWS_PER_CHUNK]
    return out if out is not None else np.empty((0, 0), np.uint8)
