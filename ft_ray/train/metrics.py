"""Run-directory metrics: CSV files and TensorBoard event files (rank 0 only), and the same rows to
the run's experiment tracker."""

from __future__ import annotations

import csv
import math
from pathlib import Path

import torch

from ft_ray.train.tracking import Tracker

# dense bf16 peak FLOP/s per device, for MFU; CPUs are left out (MFU is omitted there)
PEAK_FLOPS = {
    "H100": 989e12, "H200": 989e12, "B200": 2250e12, "A100": 312e12, "A10G": 125e12,
    "L40S": 362e12, "L4": 121e12, "V100": 125e12, "RTX 4090": 165e12, "RTX 3090": 71e12,
}


def peak_flops(device: torch.device) -> float | None:
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    for key, value in PEAK_FLOPS.items():
        if key in name:
            return value
    return None


def peak_memory_mib(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # peak RSS of this worker


def _drop_rows_after(path: Path, step: int) -> None:
    with path.open(newline="") as f:
        rows = list(csv.reader(f))
    if len(rows) < 2 or rows[0][:1] != ["step"]:
        return
    kept = [rows[0]] + [r for r in rows[1:] if r and int(float(r[0])) <= step]
    if len(kept) < len(rows):
        tmp = path.with_suffix(".csv.tmp")
        with tmp.open("w", newline="") as f:
            csv.writer(f).writerows(kept)
        tmp.replace(path)


# a row's metric names in the tracker: the names the run reports to Ray and Tune (val_nll, ...)
TRACKED_PREFIX = {"train": "", "eval": "val_"}


class MetricsWriter:
    """One CSV per kind of row (train.csv, eval.csv) plus TensorBoard scalars under tb/, and
    each row to `tracker` (which the caller starts and closes)."""

    def __init__(self, run_dir: str | Path, enabled: bool = True, resume_step: int = 0,
                 tracker: Tracker | None = None):
        """`resume_step`: the step of the checkpoint the run continues from. Rows logged after it
        (by a run killed before its next checkpoint) are dropped: those steps run, and log, again."""
        self.dir, self.enabled = Path(run_dir), enabled
        self.tracker = tracker or Tracker()
        self._tb = None
        if enabled:
            self.dir.mkdir(parents=True, exist_ok=True)
            for path in self.dir.glob("*.csv"):
                _drop_rows_after(path, resume_step)
            try:
                from tensorboardX import SummaryWriter

                self._tb = SummaryWriter(str(self.dir / "tb"))
            except ImportError:  # TensorBoard files are a convenience; the CSVs are the record
                self._tb = None

    def write(self, kind: str, step: int, row: dict[str, float]) -> None:
        if not self.enabled:
            return
        path = self.dir / f"{kind}.csv"
        row = {"step": step, **row}
        new = not path.exists()
        if not new:
            with path.open() as f:
                header = next(csv.reader(f), [])
            if header != list(row):  # columns changed (e.g. a resumed run with other metrics)
                path = self.dir / f"{kind}-{step}.csv"
                new = not path.exists()
        with path.open("a", newline="") as f:
            w = csv.DictWriter(f, fieldnames=list(row))
            if new:
                w.writeheader()
            w.writerow(row)
        if self._tb is not None:
            for k, v in row.items():
                if k != "step" and isinstance(v, (int, float)) and math.isfinite(v):
                    self._tb.add_scalar(f"{kind}/{k}", v, step)
            self._tb.flush()
        prefix = TRACKED_PREFIX.get(kind, f"{kind}_")
        # downstream metrics (eval/<task>/<metric>) keep their names, as the run reports them
        self.tracker.log_metrics(step, {k if k.startswith("eval/") else f"{prefix}{k}": v
                                        for k, v in row.items() if k != "step"})

    def close(self) -> None:
        if self._tb is not None:
            self._tb.close()
