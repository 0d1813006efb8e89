"""Compare a baseline and Free Transformers at several kappa on the same data (see ft_ray/compare.py).

    python -m jobs.compare --config letters-ft --kappa 0.125 1 2
    ray job submit --working-dir . -- python -m jobs.compare --config letters-ft
"""

from __future__ import annotations

import sys

from ft_ray.cli import run_command


def main(argv: list[str] | None = None) -> int:
    """`ft-ray compare ARGS` (ARGS from the command line by default)."""
    return run_command("compare", argv)


if __name__ == "__main__":
    sys.exit(main())
