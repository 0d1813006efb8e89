"""Experiment tracking: one MLflow run per training run, logged from rank 0 in the background.

`Tracker` is what the training loop talks to (`start`, `log_metrics`, `log_artifacts`, `close`);
the base class does nothing and serves `train.tracking: none` and every rank but 0.
`MlflowTracker` puts what it is given on a bounded queue and returns: one background thread
imports MLflow, finds or creates the experiment and the run, sends metrics in batches
(`log_batch`) and uploads artifacts at the end. The loop never waits on the store:

- a full queue drops the row (counted in `dropped`) instead of blocking;
- a store that fails is reported once on stderr, and retried in the background with a growing
  pause (a server is probed first, with a short timeout, so a dead one costs no HTTP retries);
  up to MAX_PENDING metric values are held meanwhile, and the CSV files stay the record;
- `blocking_s` is the time the loop spent inside tracker calls (`close_s` of it in `close`, which
  waits, bounded, for the last metrics and artifacts): what the bench reports.

A resumed run continues its MLflow run: the run id is kept in the run directory (RUN_ID_FILE).
MLflow's history is append-only, so the steps an attempt logged after the checkpoint the run
resumes from (before it was killed) are logged again by the resumed attempt: such a step has two
points in the history, and the run's latest value is the one of the attempt that finished.
Params never change in MLflow: a resumed run with new values of the keys a resume may change
(e.g. train.max_steps) records them in the tag `ft_ray.changed_on_resume`.
"""

from __future__ import annotations

import json
import logging
import math
import os
import queue
import subprocess
import sys
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from ft_ray.config import Config, to_dict

DB_NAME = "mlflow.db"  # the embedded store (train.tracking: mlflow), beside the run directories
ARTIFACTS_DIR = "mlartifacts"  # the embedded store's artifacts, beside its database
RUN_ID_FILE = "mlflow_run.json"  # in the run directory: {tracking_uri, experiment_id, run_id}
QUEUE_SIZE = 1024  # log calls in flight; a full queue drops
MAX_PENDING = 100_000  # metric values held while the store does not answer
PROBE_TIMEOUT_S = 3.0  # a server must answer within this to be tried
RETRY_S = (5.0, 60.0)  # first and longest pause between attempts on a failing store
# metrics are sent at most this often, in one batch: a sqlite store costs ~4 ms of CPU per call
# plus ~80 us per value, taken from the loop's core and GIL (25% of a 16 ms smoke step when sent
# every other step; batched, ~1 ms per logged step). A rank 0 killed (SIGKILL) loses at most the
# rows of its last SEND_EVERY_S from MLflow; the CSV files have them.
SEND_EVERY_S = 2.0
CLOSE_TIMEOUT_S = 120.0  # longest wait at the end for the last metrics and artifacts
# MLflow's HTTP client retries 7 times with a 120 s timeout by default (minutes per call): lower,
# unless the environment says otherwise. The calls run in the background thread either way.
HTTP_DEFAULTS = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "2", "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1",
                 "MLFLOW_HTTP_REQUEST_TIMEOUT": "30"}
# what MLflow accepts per log_batch call
MAX_METRICS_PER_BATCH, MAX_PARAMS_PER_BATCH = 1000, 100


def embedded_store_uri(directory: str | Path) -> str:
    """The embedded store of the runs in `directory` (a storage path, or a sweep's directory)."""
    return f"sqlite:///{Path(directory).expanduser().resolve() / DB_NAME}"


def tracking_uri(tracking: str, run_dir: str | Path) -> str | None:
    """The store `train.tracking` names for the run in `run_dir`: None for `none`, the embedded
    store of its storage path for `mlflow`, else the URI itself."""
    if tracking == "none":
        return None
    return embedded_store_uri(Path(run_dir).parent) if tracking == "mlflow" else tracking


def _artifact_root(uri: str) -> str | None:
    """Where an experiment created in `uri` keeps its artifacts: beside a sqlite database (MLflow
    would use ./mlruns of whatever the current directory is); a server decides for itself."""
    if uri.startswith("sqlite:///"):
        return (Path(uri.removeprefix("sqlite:///")).parent / ARTIFACTS_DIR).as_uri()
    return None


def flat_params(cfg: Config) -> dict[str, str]:
    """The resolved config as MLflow params: dotted keys, values as text."""
    def flat(tree: dict, prefix: str = "") -> dict:
        out: dict[str, str] = {}
        for k, v in tree.items():
            out.update(flat(v, f"{prefix}{k}.") if isinstance(v, dict) else {f"{prefix}{k}": str(v)})
        return out

    return flat(to_dict(cfg))


def run_tags(cfg: Config, run_dir: Path) -> dict[str, str]:
    """Tags to filter and group runs by (the git commit is added by the background thread)."""
    m = cfg.model
    tags = {"arch": m.arch, "run_dir": str(run_dir)}
    if m.has_latent:
        tags.update(latent_bits=str(m.latent_bits), kappa_bits=f"{m.free_bits:g}")
    return tags


def run_artifacts(run_dir: str | Path, log_weights: bool) -> list[Path]:
    """What a finished run uploads: config.yaml, plots, the bundle's config.json and metrics.json,
    and (`log_weights`) the rest of the bundle."""
    run_dir = Path(run_dir)
    paths = [run_dir / "config.yaml", *sorted(run_dir.glob("*.png")),
             run_dir / "bundle" / "config.json", run_dir / "bundle" / "metrics.json"]
    if log_weights:
        paths += sorted(p for p in (run_dir / "bundle").glob("*") if p not in paths)
    return [p for p in paths if p.is_file()]


def git_commit() -> str | None:
    """The commit of the ft-ray checkout this code runs from, when it is one (a job's working_dir
    is not)."""
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=Path(__file__).resolve().parent,
                             capture_output=True, text=True, timeout=5)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() if out.returncode == 0 and out.stdout.strip() else None


def _warn_stderr(message: str) -> None:
    print(f"[ft-ray] warning: {message}", file=sys.stderr, flush=True)


class Tracker:
    """The tracking contract of the training loop; this one records nothing."""

    def __init__(self) -> None:
        self.blocking_s = 0.0  # time the caller spent inside tracker calls
        self.close_s = 0.0  # the part of it spent in close()
        self.dropped = 0  # metric values not delivered because the queue was full

    def start(self, cfg: Config, run_dir: str | Path) -> None:
        pass

    def log_metrics(self, step: int, metrics: dict[str, float]) -> None:
        pass

    def log_artifacts(self, paths: Sequence[str | Path]) -> None:
        pass

    def close(self) -> None:
        pass


def make_tracker(tracking: str, rank: int) -> Tracker:
    """`train.tracking`'s tracker for this rank: only rank 0 records."""
    return MlflowTracker() if rank == 0 and tracking != "none" else Tracker()


class MlflowTracker(Tracker):
    def __init__(self, queue_size: int = QUEUE_SIZE, retry_s: tuple[float, float] = RETRY_S,
                 send_every_s: float = SEND_EVERY_S, close_timeout_s: float = CLOSE_TIMEOUT_S,
                 warn=_warn_stderr):
        super().__init__()
        self._queue: queue.Queue = queue.Queue(maxsize=queue_size)
        self._retry_s, self._send_every_s = retry_s, send_every_s
        self._close_timeout_s, self._warn = close_timeout_s, warn
        self._warned = False
        self._closing = threading.Event()
        self._thread: threading.Thread | None = None
        self.uri: str | None = None

    def start(self, cfg: Config, run_dir: str | Path) -> None:
        t0 = time.perf_counter()
        run_dir = Path(run_dir)
        self.uri = tracking_uri(cfg.train.tracking, run_dir)
        if self.uri is not None:
            sender = _Sender(self.uri, cfg.train.tracking_experiment, cfg.train.name, flat_params(cfg),
                             run_tags(cfg, run_dir), run_dir, self._warn_once, self._retry_s, self._send_every_s)
            self._thread = threading.Thread(target=self._work, args=(sender,), name="ft-ray-mlflow", daemon=True)
            self._thread.start()
        self.blocking_s += time.perf_counter() - t0

    def log_metrics(self, step: int, metrics: dict[str, float]) -> None:
        if self._thread is None:
            return
        t0 = time.perf_counter()
        values = {k: float(v) for k, v in metrics.items()
                  if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)}
        if values and not self._put(("metrics", step, int(time.time() * 1000), values)):
            self.dropped += len(values)
        self.blocking_s += time.perf_counter() - t0

    def log_artifacts(self, paths: Sequence[str | Path]) -> None:
        t0 = time.perf_counter()
        self._put(("artifacts", [Path(p) for p in paths]))
        self.blocking_s += time.perf_counter() - t0

    def close(self) -> None:
        """Send what is queued (waiting at most close_timeout_s) and mark the run finished."""
        t0 = time.perf_counter()
        if self._thread is not None:
            self._closing.set()
            self._thread.join(self._close_timeout_s)
            if self._thread.is_alive():
                self._warn_once(f"MLflow tracking at {self.uri} did not finish within "
                                f"{self._close_timeout_s:g} s; the run goes on without it")
        self._thread = None
        self.close_s = time.perf_counter() - t0
        self.blocking_s += self.close_s

    def _put(self, item: tuple) -> bool:
        if self._thread is None:
            return False
        try:
            self._queue.put_nowait(item)
            return True
        except queue.Full:
            self._warn_once(f"MLflow tracking at {self.uri} falls behind: rows are dropped "
                            "(the CSV files keep every metric)")
            return False

    def _warn_once(self, message: str) -> None:
        if not self._warned:
            self._warned = True
            self._warn(message)

    def _work(self, sender: _Sender) -> None:
        """The background thread: wake on a timer (never on a row: a blocked getter would take
        the GIL from the loop at every put) or on close, take what is queued, send it."""
        while True:
            closing = self._closing.wait(sender.wait_s())
            while True:
                try:
                    sender.add(self._queue.get_nowait())
                except queue.Empty:
                    break
            if closing:
                break
            sender.flush()
        sender.flush(final=True)


class _Sender:
    """Everything the background thread says to MLflow: find or create the run, then send what
    is pending; a failure keeps what is pending and retries after a pause."""

    def __init__(self, uri: str, experiment: str, run_name: str, params: dict, tags: dict,
                 run_dir: Path, warn, retry_s: tuple[float, float] = RETRY_S,
                 send_every_s: float = SEND_EVERY_S):
        self.uri, self.experiment, self.run_name = uri, experiment, run_name
        self.params, self.tags, self.run_dir, self.warn = params, tags, run_dir, warn
        self.retry_s, self.send_every_s = retry_s, send_every_s
        self.client: Any = None  # an MlflowClient once `_ensure_run` has made one (MLflow imports lazily)
        self.run_id = self._created = None
        self.metrics: list[tuple] = []  # (key, value, timestamp ms, step) not sent yet
        self.artifacts: list[Path] = []
        self.failures, self.next_try = 0, 0.0  # next_try: after a failure, or the last send

    def wait_s(self) -> float:
        """How long the thread sleeps: until the next attempt (the first one at once)."""
        return max(0.05, self.next_try - time.monotonic())

    def add(self, item: tuple) -> None:
        if item[0] == "metrics":
            _, step, stamp_ms, values = item
            self.metrics += [(k, v, stamp_ms, step) for k, v in values.items()]
            del self.metrics[:-MAX_PENDING]  # a long outage: keep the newest
        else:
            self.artifacts += item[1]

    def flush(self, final: bool = False) -> None:
        if not final and time.monotonic() < self.next_try:
            return
        try:  # everything MLflow, its import included: a node without it warns like a dead server
            self._ensure_run()
            from mlflow.entities import Metric

            while self.metrics:
                batch = [Metric(*m) for m in self.metrics[:MAX_METRICS_PER_BATCH]]
                self.client.log_batch(self.run_id, metrics=batch)
                del self.metrics[:MAX_METRICS_PER_BATCH]
            while self.artifacts:
                self._upload(self.artifacts[0])
                self.artifacts.pop(0)
            if final:
                self.client.set_terminated(self.run_id, "FINISHED")
            self.failures, self.next_try = 0, time.monotonic() + self.send_every_s
        except Exception as e:  # noqa: BLE001 - tracking never stops training, whatever the store says
            self._failed(e)

    def _failed(self, error: Exception) -> None:
        first, longest = self.retry_s
        self.next_try = time.monotonic() + min(longest, first * 2 ** self.failures)
        self.failures += 1
        why = (str(error).strip().splitlines() or [type(error).__name__])[0][:300]
        self.warn(f"MLflow tracking at {self.uri} failed ({type(error).__name__}: {why}); training "
                  f"continues and the CSV files in {self.run_dir} keep every metric; retrying in the background")

    def _ensure_run(self) -> None:
        """The MLflow run of this run directory, created or (resumed run) found again; its id is
        stored first, so an attempt that fails half-way is continued, not duplicated."""
        if self.run_id is not None:
            if self.failures:  # a server that stopped answering: a quick probe, not HTTP retries
                _probe(self.uri)
            return
        _probe(self.uri)
        if self.client is None:
            self.client = _client(self.uri)
            commit = git_commit()
            if commit:
                self.tags["mlflow.source.git.commit"] = commit
        experiment_id = ensure_experiment(self.client, self.experiment, self.uri)
        run = self._stored_run() or self._created
        if run is None:
            run = self._created = self.client.create_run(experiment_id, run_name=self.run_name)
        else:  # resumed (or created by an attempt that failed half-way): the same run, running again
            self.client.update_run(run.info.run_id, status="RUNNING")
        old, run_id = run.data.params, run.info.run_id
        _write_atomically(self.run_dir / RUN_ID_FILE, json.dumps(
            {"tracking_uri": self.uri, "experiment_id": experiment_id, "run_id": run_id}, indent=2))
        from mlflow.entities import Param, RunTag

        params = [Param(k, v) for k, v in self.params.items() if k not in old]
        changed = [f"{k}: {old[k]} -> {v}" for k, v in self.params.items() if k in old and old[k] != v]
        tags = {**self.tags, **({"ft_ray.changed_on_resume": "; ".join(changed)[:5000]} if changed else {})}
        self.client.log_batch(run_id, tags=[RunTag(k, v) for k, v in tags.items()])
        for i in range(0, len(params), MAX_PARAMS_PER_BATCH):
            self.client.log_batch(run_id, params=params[i:i + MAX_PARAMS_PER_BATCH])
        self.run_id = run_id

    def _stored_run(self):
        """The run this run directory logged to before, in this store (None: a new run)."""
        path = self.run_dir / RUN_ID_FILE
        if not path.is_file():
            return None
        stored = json.loads(path.read_text())
        if stored.get("tracking_uri") != self.uri:  # moved to another store: a new run there
            return None
        from mlflow.exceptions import MlflowException

        try:
            run = self.client.get_run(stored["run_id"])
        except MlflowException:  # deleted, or the store was replaced
            return None
        return run if run.info.lifecycle_stage == "active" else None

    def _upload(self, path: Path) -> None:
        """`path` under the run directory keeps its relative folder (bundle/config.json)."""
        if not path.is_file():
            return
        try:
            folder = path.parent.relative_to(self.run_dir).as_posix()
        except ValueError:
            folder = "."
        self.client.log_artifact(self.run_id, str(path), artifact_path=None if folder == "." else folder)


def _probe(uri: str) -> None:
    """A server answers (any HTTP status) within PROBE_TIMEOUT_S, or this raises: a dead one
    costs one short wait instead of MLflow's HTTP retries."""
    if uri.startswith(("http://", "https://")):
        import requests

        requests.get(f"{uri.rstrip('/')}/health", timeout=PROBE_TIMEOUT_S)


def _client(uri: str):
    for name, value in HTTP_DEFAULTS.items():
        os.environ.setdefault(name, value)
    for name in ("mlflow.store.db.utils", "alembic"):  # "Creating initial MLflow database tables..."
        logging.getLogger(name).setLevel(logging.WARNING)
    from mlflow.tracking import MlflowClient

    return MlflowClient(uri)


def ensure_experiment(client, name: str, uri: str) -> str:
    """The id of the experiment `name`, created when missing (by this or a concurrent trial)."""
    from mlflow.exceptions import MlflowException

    found = client.get_experiment_by_name(name)
    if found is not None:
        return found.experiment_id
    try:
        return client.create_experiment(name, artifact_location=_artifact_root(uri))
    except MlflowException:  # another trial created it between the two calls
        found = client.get_experiment_by_name(name)
        if found is None:
            raise
        return found.experiment_id


def prepare_experiment(uri: str | None, name: str, warn=_warn_stderr) -> None:
    """Create the store (an embedded database: its tables) and the experiment once, before a
    sweep's trials start, so concurrent trials only log. Never fails: trials retry on their own."""
    if uri is None:
        return
    try:
        _probe(uri)
        ensure_experiment(_client(uri), name, uri)
    except Exception as e:  # noqa: BLE001
        warn(f"MLflow tracking at {uri} is not reachable now ({type(e).__name__}); the trials "
             "will try again and train either way")


def _write_atomically(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)  # the thread may get there before the loop's files
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(text)
    os.replace(tmp, path)
