"""Write token shards: a synthetic task or a real corpus (see ft_ray/data/cli.py).

    python -m jobs.prepare_data synthetic --task letters --num-sequences 100000 --out data/letters
    python -m jobs.prepare_data corpus --source stdlib --tokenizer bpe:4096 --seq-len 256 --out data/stdlib
    ray job submit --working-dir . -- python -m jobs.prepare_data synthetic --out /shared/data/letters
    ray job submit --working-dir . -- python -m jobs.prepare_data corpus --source '/shared/text/*.txt' \
        --tokenizer bpe:4096 --seq-len 256 --ray --out /shared/data/text   # a Ray Data job on every node

On a cluster, --out must be a path that every node reaches (a shared file system): the training
job's workers read the shards from there; with `corpus --ray` the tokenizer actors and pack tasks
write them there too (the work directory `.<out>.prepare/` beside it must be shared as well).
"""

from __future__ import annotations

import sys

from ft_ray.cli import run_command


def main(argv: list[str] | None = None) -> int:
    """`ft-ray data ARGS` (ARGS from the command line by default)."""
    return run_command("data", argv)


if __name__ == "__main__":
    sys.exit(main())
