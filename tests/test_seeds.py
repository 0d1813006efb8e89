"""The one seed scheme (ft_ray/seeds.py)."""

from __future__ import annotations

import hashlib

from ft_ray.seeds import derive_seed, row_seed


def test_derive_seed_is_blake2b_of_the_keys_and_keeps_served_plans_stable():
    def reference(*parts) -> int:  # the formula plans were seeded with before the keys were variadic
        digest = hashlib.blake2b(":".join(map(str, parts)).encode(), digest_size=8).digest()
        return int.from_bytes(digest, "little") >> 1

    assert derive_seed(1234, 1) == reference(1234, 1) == reference(1234, "1")
    assert derive_seed(7, "train", 3) == reference(7, "train", 3)
    assert 0 <= derive_seed(2**62, "plan") < 2**63
    seeds = {derive_seed(0, split, chunk) for split in ("train", "val") for chunk in range(100)}
    assert len(seeds) == 200  # independent streams per key
    assert [row_seed(5, j) for j in range(3)] == [5, derive_seed(5, 1), derive_seed(5, 2)]
