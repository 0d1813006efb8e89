"""Evaluate bundles on lm-eval tasks over plan seeds, on Ray (see ft_ray/eval/cli.py).

    python -m jobs.eval --models baseline=runs/b/bundle ft=runs/f/bundle --tasks ftray \
        --num-plans 8 --seeds 0 1 2 --out results/eval
    ray job submit --working-dir . -- python -m jobs.eval --models ... --out results/eval
"""

from __future__ import annotations

import sys

from ft_ray.cli import run_command


def main(argv: list[str] | None = None) -> int:
    """`ft-ray eval ARGS` (ARGS from the command line by default)."""
    return run_command("eval", argv)


if __name__ == "__main__":
    sys.exit(main())
