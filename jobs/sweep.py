"""Run a Ray Tune sweep (see ft_ray/tune/runner.py).

    python -m jobs.sweep --space tune_spaces/smoke.yaml
    ray job submit --working-dir . -- python -m jobs.sweep --space tune_spaces/latent_free_bits.yaml
"""

from __future__ import annotations

import sys

from ft_ray.cli import run_command


def main(argv: list[str] | None = None) -> int:
    """`ft-ray sweep ARGS` (ARGS from the command line by default)."""
    return run_command("sweep", argv)


if __name__ == "__main__":
    sys.exit(main())
