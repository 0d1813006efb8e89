"""`arith`: multi-step arithmetic in words, a synthetic task whose held-out problems are the
evaluation suite's documents (ft_ray/eval/tasks).

A problem is 2 or 3 single-digit operands joined by `plus` / `times` (usual precedence), written
in words with `_` between words, then `>`, then the value in words:
    seven_plus_three_times_two>thirteen
Words, not digits: the letter task's character vocabulary (letters.py) has no digits or `+*=`,
and extending it would change every synthetic tokenizer's vocab_size (models sized 64 would no
longer fit); lowercase letters, `_` and `>` are all in it.

Held-out split by construction: a problem belongs to the evaluation set when a hash of its text
says so (`is_heldout`), whatever the seed; training rows are drawn from the other problems only.
A training row is 68 tokens (as the other synthetic tasks, so configs carry over): documents
`<bos> problem <eos>` packed one after the other, the last one cut at the row's end.
"""

from __future__ import annotations

import functools
import hashlib
import itertools

import numpy as np

from ft_ray.data import letters

ONES = ("zero one two three four five six seven eight nine ten eleven twelve thirteen fourteen "
        "fifteen sixteen seventeen eighteen nineteen").split()
TENS = {2: "twenty", 3: "thirty", 4: "forty", 5: "fifty", 6: "sixty", 7: "seventy", 8: "eighty",
        9: "ninety"}
OPS = ("plus", "times")
NUM_OPERANDS = (2, 3)
HELDOUT_MOD = 8  # one problem in 8 is held out for evaluation
SEQ_TOKENS = letters.SEQ_TOKENS  # 68, as every synthetic task
PROMPT_TOKENS = 1  # BOS: a row starts a new problem, whose length varies


def number_words(n: int) -> str:
    """0 <= n < 1000 in words joined by `_`: 729 -> seven_hundred_twenty_nine."""
    if not 0 <= n < 1000:
        raise ValueError(f"number_words covers 0..999, got {n}")
    if n < 20:
        return ONES[n]
    if n < 100:
        return TENS[n // 10] + ("" if n % 10 == 0 else "_" + ONES[n % 10])
    rest = n % 100
    return ONES[n // 100] + "_hundred" + ("" if rest == 0 else "_" + number_words(rest))


def evaluate(operands: tuple[int, ...], ops: tuple[str, ...]) -> int:
    """The value with the usual precedence: products first, then the sum of the terms."""
    terms, term = [], operands[0]
    for op, x in zip(ops, operands[1:]):
        if op == "times":
            term *= x
        else:
            terms.append(term)
            term = x
    return sum(terms) + term


def expression(operands: tuple[int, ...], ops: tuple[str, ...]) -> str:
    words = [ONES[operands[0]]]
    for op, x in zip(ops, operands[1:]):
        words += [op, ONES[x]]
    return "_".join(words)


def is_heldout(prompt: str) -> bool:
    """Whether a problem (its prompt text) belongs to the evaluation set; the same everywhere."""
    digest = hashlib.blake2b(prompt.encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") % HELDOUT_MOD == 0


@functools.cache
def problems(num_operands: int) -> tuple[tuple[str, int, tuple[int, ...], tuple[str, ...]], ...]:
    """Every problem with `num_operands` operands, in a fixed order: (prompt, value, operands, ops),
    the prompt ending in `>`."""
    out = []
    for operands in itertools.product(range(10), repeat=num_operands):
        for ops in itertools.product(OPS, repeat=num_operands - 1):
            out.append((expression(operands, ops) + ">", evaluate(operands, ops), operands, ops))
    return tuple(out)


def heldout_problems() -> list[tuple[str, int, tuple[int, ...], tuple[str, ...]]]:
    return [p for n in NUM_OPERANDS for p in problems(n) if is_heldout(p[0])]


@functools.cache
def _train_ids(num_operands: int) -> tuple[np.ndarray, ...]:
    """Token ids of every training document `<bos> prompt answer <eos>` with that many operands."""
    return tuple(np.array([letters.BOS_ID, *letters.encode(p + number_words(v)), letters.EOS_ID])
                 for p, v, _, _ in problems(num_operands) if not is_heldout(p))


def arith_sequences(num: int, seed: int) -> np.ndarray:
    """`num` training rows (num, 68) int64, deterministic in `seed`: packed training documents,
    2 or 3 operands with equal probability, never a held-out problem."""
    rng = np.random.default_rng(seed)
    pools = [_train_ids(n) for n in NUM_OPERANDS]
    out = np.empty((num, SEQ_TOKENS), dtype=np.int64)
    for row in range(num):
        docs, filled = [], 0
        while filled < SEQ_TOKENS:
            pool = pools[rng.integers(len(pools))]
            docs.append(pool[rng.integers(len(pool))])
            filled += len(docs[-1])
        out[row] = np.concatenate(docs)[:SEQ_TOKENS]
    return out
