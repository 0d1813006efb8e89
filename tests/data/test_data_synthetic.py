"""Synthetic tasks: exact format, noise rate, uniformity (chi-square), determinism, evaluators."""

from __future__ import annotations

import numpy as np
import pytest

from ft_ray.data import letters, synthetic
from ft_ray.data.errors import DataError
from ft_ray.data.letters import BODY_LEN, NOISE_PROB, RUN_LEN, check_body
from ft_ray.data.synthetic import MODE_PATTERNS, check_modes_body, generate

NUM_STAT = 20_000
# chi-square critical values at p = 0.999 (computed with mpmath), so a fair generator fails 1/1000
CHI2_999 = {3: 16.266, 25: 52.620, 56: 94.461}
ORIGINAL_VOCAB = ["<pad>", "<bos>", "<eos>", "_", "!", ">", *"ABCDEFGHIJKLMNOPQRSTUVWXYZ"]


def chi_square(values: np.ndarray, num_categories: int) -> float:
    counts = np.bincount(values, minlength=num_categories)
    expected = len(values) / num_categories
    return float(((counts - expected) ** 2 / expected).sum())


def assert_rate(hits: np.ndarray, p: float) -> None:
    """Mean of Bernoulli(p) draws within 5 standard errors of p."""
    se = np.sqrt(p * (1 - p) / hits.size)
    assert abs(hits.mean() - p) < 5 * se, (hits.mean(), p, se)


def texts(seqs: np.ndarray) -> list[str]:
    return [letters.decode(row) for row in seqs]


def test_letter_ids_unchanged_by_vocab_extension():
    assert letters.VOCAB[: len(ORIGINAL_VOCAB)] == ORIGINAL_VOCAB
    assert all(letters.CHAR_TO_ID[c] == i for i, c in enumerate(ORIGINAL_VOCAB))


def test_letters_exact_format():
    seqs = generate("letters", 2000, seed=0)
    assert seqs.shape == (2000, 68) and seqs.dtype == np.int64
    assert (seqs[:, 0] == letters.BOS_ID).all() and (seqs[:, -1] == letters.EOS_ID).all()
    assert (seqs[:, 2] == letters.CHAR_TO_ID[">"]).all()
    for text in texts(seqs):
        letter, body = text[0], text[2:]
        assert letter in letters.LETTERS and len(body) == BODY_LEN
        assert set(body) <= {"_", "!", letter}
        assert check_body(body, letter).valid


def test_letters_noise_rate_and_uniformity():
    rng = np.random.default_rng(1)
    which, starts, text = letters.make_bodies(NUM_STAT, rng)
    body = text[:, 2:]
    assert_rate(body == ord("!"), NOISE_PROB)
    assert chi_square(which, 26) < CHI2_999[25]
    assert chi_square(starts, letters.NUM_STARTS) < CHI2_999[56]
    # the drawn latents are what the bodies show: letters (or noise) exactly in the run window
    cols = np.arange(BODY_LEN)[None, :]
    in_run = (cols >= starts[:, None]) & (cols < starts[:, None] + RUN_LEN)
    is_letter = body == (ord("A") + which)[:, None]
    assert not (is_letter & ~in_run).any()
    assert ((is_letter | (body == ord("!"))) == (in_run | (body == ord("!")))).all()
    assert (text[:, 0] == ord("A") + which).all()


def test_generate_is_deterministic_in_seed():
    for task in synthetic.TASKS:
        a, b = generate(task, 300, seed=7), generate(task, 300, seed=7)
        assert np.array_equal(a, b)
        assert not np.array_equal(a, generate(task, 300, seed=8))


def body(run_at: int | None = 10, letter: str = "A", run: str | None = None, length: int = 64) -> str:
    chars = ["_"] * length
    if run_at is not None:
        for i, c in enumerate(run or letter * RUN_LEN):
            chars[run_at + i] = c
    return "".join(chars)


@pytest.mark.parametrize("sample, letter, valid, start", [
    (body(10), "A", True, 10),
    (body(0), "A", True, 0),
    (body(56), "A", True, 56),
    (body(10, run="AAA!AAAA"), "A", True, 10),
    (body(10, run="AAAA_AAA"), "A", False, 10),  # broken run
    (body(10, run="AAAA"), "A", False, 10),  # too short
    (body(10, "B"), "A", False, None),  # wrong letter
    (body(10)[:-1], "A", False, 10),  # wrong length
    (body(None), "A", False, None),  # no run at all
    ("".join("A" if i in (3, 40) else "_" for i in range(64)), "A", False, 3),  # scattered
    (body(10)[:30] + "A" + body(10)[31:], "A", False, 10),  # a ninth letter far away
])
def test_check_body_hand_made(sample, letter, valid, start):
    result = check_body(sample, letter)
    assert result.valid is valid and result.start == start
    assert result.noise == tuple(i for i, c in enumerate(sample) if c == "!")


def test_check_body_reports_noise_positions():
    sample = "!" + body(20, run="AA!AAAAA")[1:]
    result = check_body(sample, "A")
    assert result.valid and result.noise == (0, 22)


def test_modes_exact_format_and_evaluator():
    seqs = generate("modes", 2000, seed=0)
    assert seqs.shape == (2000, 68)
    assert (seqs[:, 0] == letters.BOS_ID).all() and (seqs[:, -1] == letters.EOS_ID).all()
    for text in texts(seqs):
        assert text[:2] == "M>" and len(text) == 66
        assert set(text[2:50]) <= {"_", "!"} and text[50:] in MODE_PATTERNS
        assert check_modes_body(text[2:]) == MODE_PATTERNS.index(text[50:])


def test_modes_statistics():
    modes, text = synthetic.make_mode_bodies(NUM_STAT, np.random.default_rng(2))
    assert chi_square(modes, 4) < CHI2_999[3]
    filler, pattern = text[:, 2:50], text[:, 50:]
    assert_rate(filler == ord("!"), NOISE_PROB)
    patterns = np.array([[ord(c) for c in p] for p in MODE_PATTERNS], dtype=np.uint8)
    assert np.array_equal(pattern, patterns[modes])  # the pattern is exact and shows the mode


@pytest.mark.parametrize("sample, mode", [
    *[("_" * 48 + p, m) for m, p in enumerate(MODE_PATTERNS)],
    ("_!__" * 12 + "abcd" * 4, 2),
    ("_" * 48 + "ab" * 7 + "ba", None),  # not a pattern
    ("_" * 48 + "a!" + "ab" * 7, None),  # noise inside the pattern
    ("_" * 47 + "a" + "ab" * 8, None),  # a letter in the filler
    ("_" * 47 + "ab" * 8, None),  # wrong length
])
def test_check_modes_body_hand_made(sample, mode):
    assert check_modes_body(sample) == mode


def test_unknown_task():
    with pytest.raises(DataError, match="unknown synthetic task 'nope'.*letters, modes"):
        generate("nope", 1, 0)
