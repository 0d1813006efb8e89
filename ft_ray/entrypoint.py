"""The entry-point layer: what `ft-ray <command>` and `python -m jobs.<command>` share.

Every command is one function `run(args)` with its arguments added by `add_arguments(parser)`;
the `ft-ray` CLI (ft_ray/cli.py) registers them as subcommands, and `jobs/<command>.py` (the
`ray job submit` entry points) call `ft_ray.cli.run_command`. Bad input ends with one line on
stderr and exit status EXIT_BAD_INPUT, never a traceback.
"""

from __future__ import annotations

import contextlib
import sys

from ft_ray.config import ConfigError

EXIT_BAD_INPUT = 2


@contextlib.contextmanager
def one_line_errors():
    """Bad input ends with one line on stderr and exit status 2, not a traceback."""
    from ft_ray.data.errors import DataError
    from ft_ray.train.checkpoint import CheckpointError

    try:
        yield
    except (ConfigError, DataError, CheckpointError, FileNotFoundError) as e:
        print(f"ft-ray: error: {e}", file=sys.stderr)
        sys.exit(EXIT_BAD_INPUT)
