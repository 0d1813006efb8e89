"""The one seed scheme: every seed derived from another is `derive_seed(seed, *keys)`.

A derived seed is a 63-bit integer from blake2b over "seed:key1:key2...", so it is the same in
every process and on every machine (unlike `hash()`), and different keys give independent
streams. Users: the plan and token generators of generation and serving (`row_seed`), the
synthetic tasks' rows (`synthetic_rows`, per (seed, split, chunk)), and the evaluation's plan
draws.
"""

from __future__ import annotations

import hashlib


def derive_seed(seed: int, *keys: int | str) -> int:
    """A 63-bit seed derived from (seed, keys...)."""
    digest = hashlib.blake2b(":".join(str(k) for k in (seed, *keys)).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1


def row_seed(seed: int, index: int) -> int:
    """The seed of row `index` of a group seeded with `seed`: the seed itself for row 0."""
    return seed if index == 0 else derive_seed(seed, index)
