"""Train one model on Ray Train.

    python -m jobs.train --config jobs/configs/<name>.yaml [--set a.b=c ...]
    ray job submit --working-dir . -- python -m jobs.train --config smoke

Without RAY_ADDRESS an embedded local cluster sized to the machine is started; with it, the job
joins that cluster. Outputs go to train.storage_path/train.name (checkpoints, CSV and TensorBoard
metrics, the resolved config, and the serving bundle in bundle/).
"""

from __future__ import annotations

import sys

from ft_ray.cli import run_command


def main(argv: list[str] | None = None) -> int:
    """`ft-ray train ARGS` (ARGS from the command line by default)."""
    return run_command("train", argv)


if __name__ == "__main__":
    sys.exit(main())
