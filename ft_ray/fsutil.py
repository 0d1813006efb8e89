"""Directories written all at once: a reader sees the old contents or the new ones, never a mix.

Shard sets (and, later, serving bundles) are written into a hidden temporary sibling of their
target and moved into place only when complete, so a run that fails half-way, or is interrupted,
leaves the target exactly as it was.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


@contextmanager
def atomic_directory(target: str | Path) -> Iterator[Path]:
    """Yield an empty directory beside `target`; when the block ends cleanly it replaces `target`.

    On any exception (KeyboardInterrupt included) the temporary directory is deleted and
    `target` is untouched. A symlinked target keeps its link: what it points to is replaced.
    """
    real = Path(target).resolve()
    real.parent.mkdir(parents=True, exist_ok=True)
    # same parent: the final rename never crosses a file system, so it cannot half-happen
    tmp = Path(tempfile.mkdtemp(prefix=f".{real.name}.tmp-", dir=real.parent))
    try:
        os.chmod(tmp, _directory_mode(real))  # mkdtemp's 0700 would hide the files from others
        yield tmp
        _swap_into_place(tmp, real)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _directory_mode(target: Path) -> int:
    """The mode the target has, or the one a plain mkdir would give it (0777 less the umask)."""
    if target.is_dir():
        return target.stat().st_mode & 0o7777
    umask = os.umask(0)  # reading the umask means setting it: put it straight back
    os.umask(umask)
    return 0o777 & ~umask


def _swap_into_place(tmp: Path, target: Path) -> None:
    """Rename `tmp` to `target`; an existing target is moved aside first and deleted only after."""
    if not target.exists():
        tmp.rename(target)
        return
    old = target.with_name(f".{target.name}.old-{os.getpid()}")
    target.rename(old)
    try:
        tmp.rename(target)
    except BaseException:
        old.rename(target)  # the target must never be left missing
        raise
    shutil.rmtree(old, ignore_errors=True)
