"""Experiment tracking in MLflow: the tracker against a real `mlflow server` on loopback and the
embedded default store (params, metrics per step, tags and artifacts read back with
MlflowClient), a real training run in-process and its resume (the same MLflow run), a dead server
(one warning, the loop never waits, the CSV written), bad values; then a Ray Train run and a
sweep (one experiment per sweep) on the session's cluster."""

from __future__ import annotations

import csv
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from ft_ray.cluster import free_port
from ft_ray.config import ConfigError, load_config
from ft_ray.train.tracking import (
    RUN_ID_FILE,
    MlflowTracker,
    Tracker,
    embedded_store_uri,
    make_tracker,
    run_artifacts,
)

ROOT = Path(__file__).resolve().parents[2]
SMOKE = ROOT / "jobs" / "configs" / "smoke.yaml"


def smoke_cfg(tmp: Path, name: str, *overrides: str):
    return load_config(SMOKE, [f"train.storage_path={tmp}", f"train.name={name}", "train.max_steps=6",
                               "train.checkpoint_every=2", "train.log_every=2", "train.eval_every=100",
                               "train.sample_groups=0", "data.batch_size=4", *overrides])


def csv_rows(path: Path) -> list[dict]:
    return list(csv.DictReader(path.read_text().splitlines()))


def client(uri: str):
    from mlflow.tracking import MlflowClient

    return MlflowClient(uri)


def the_run(uri: str, run_dir: Path):
    """The MLflow run a run directory logged to (its id from RUN_ID_FILE)."""
    import json

    stored = json.loads((run_dir / RUN_ID_FILE).read_text())
    assert stored["tracking_uri"] == uri
    return client(uri).get_run(stored["run_id"])


def history(uri: str, run_id: str, key: str) -> list[tuple[int, float]]:
    points = client(uri).get_metric_history(run_id, key)
    return sorted(((m.step, m.value) for m in points), key=lambda p: p[0])


def artifacts(uri: str, run_id: str, folder: str | None = None) -> set[str]:
    out = set()
    for f in client(uri).list_artifacts(run_id, folder):
        out |= artifacts(uri, run_id, f.path) if f.is_dir else {f.path}
    return out


def fake_run_dir(run_dir: Path) -> None:
    """The files a finished run leaves for the tracker to upload."""
    (run_dir / "bundle").mkdir(parents=True)
    (run_dir / "config.yaml").write_text("model: {}\n")
    (run_dir / "bundle" / "config.json").write_text("{}")
    (run_dir / "bundle" / "metrics.json").write_text('{"step": 6}')
    (run_dir / "bundle" / "model.safetensors").write_bytes(b"weights")


@pytest.fixture(scope="module")
def mlflow_server(tmp_path_factory):
    """A real MLflow tracking server on loopback (sqlite store, artifacts proxied through it),
    its own process group, stopped at the end."""
    import requests

    root = tmp_path_factory.mktemp("mlflow-server")
    port = free_port()
    env = {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}  # no job runner (huey)
    with (root / "server.log").open("w") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(port), "--workers", "1",
             "--backend-store-uri", f"sqlite:///{root / 'store.db'}",
             "--artifacts-destination", str(root / "artifacts")],
            env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while True:
            assert proc.poll() is None, (root / "server.log").read_text()[-3000:]
            try:
                if requests.get(f"{url}/health", timeout=2).ok:
                    break
            except requests.RequestException:
                pass
            assert time.monotonic() < deadline, "mlflow server did not start"
            time.sleep(0.25)
        yield url
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=20)


# ----------------------------------------------------------------------------------------------
# bad values, and the trackers that record nothing
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("value", ["mlfow", "ftp://host:21", "http://", "http://host:port", "sqlite://rel.db",
                                   "/some/path"])
def test_malformed_tracking_is_a_config_error_naming_the_key(tmp_path, value):
    with pytest.raises(ConfigError, match=r"train\.tracking: expected none, mlflow"):
        smoke_cfg(tmp_path, "x", f"train.tracking={value}")


def test_tracking_values_accepted(tmp_path):
    for value in ("none", "mlflow", "http://127.0.0.1:5000", "https://mlflow.example.org/prefix",
                  "sqlite:////abs/path/mlflow.db"):
        assert smoke_cfg(tmp_path, "x", f"train.tracking={value}").train.tracking == value
    cfg = smoke_cfg(tmp_path, "x")
    assert (cfg.train.tracking, cfg.train.tracking_experiment, cfg.train.tracking_log_weights) == (
        "mlflow", "ft-ray", False)
    with pytest.raises(ConfigError, match=r"train\.tracking_experiment"):
        smoke_cfg(tmp_path, "x", "train.tracking_experiment=' '")


def test_none_and_other_ranks_record_nothing(tmp_path):
    cfg = smoke_cfg(tmp_path, "x")
    for tracker in (make_tracker("none", 0), make_tracker("mlflow", 1)):
        assert type(tracker) is Tracker
        tracker.start(cfg, tmp_path / "x")
        tracker.log_metrics(1, {"loss": 1.0})
        tracker.log_artifacts([tmp_path])
        tracker.close()
        assert tracker.blocking_s == 0.0
    assert type(make_tracker("mlflow", 0)) is MlflowTracker
    assert not list(tmp_path.iterdir())  # no store, no run id file


def test_run_artifacts_leave_the_weights_out_unless_asked(tmp_path):
    fake_run_dir(tmp_path)
    (tmp_path / "curves.png").write_bytes(b"png")
    names = lambda paths: [p.relative_to(tmp_path).as_posix() for p in paths]  # noqa: E731
    assert names(run_artifacts(tmp_path, False)) == ["config.yaml", "curves.png", "bundle/config.json",
                                                     "bundle/metrics.json"]
    assert "bundle/model.safetensors" in names(run_artifacts(tmp_path, True))


# ----------------------------------------------------------------------------------------------
# a server that does not answer: one warning, the loop never waits, the CSV is written
# ----------------------------------------------------------------------------------------------


def test_unreachable_server_warns_once_and_the_loop_goes_on(tmp_path, capsys):
    from ft_ray.train.metrics import MetricsWriter

    dead = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    cfg = smoke_cfg(tmp_path, "run", f"train.tracking={dead}")
    run_dir = tmp_path / "run"
    tracker = MlflowTracker(retry_s=(0.05, 0.1), close_timeout_s=20)  # retry often: still one warning
    tracker.start(cfg, run_dir)
    log = MetricsWriter(run_dir, tracker=tracker)
    for step in range(1, 201):
        log.write("train", step, {"loss": 1.0 / step, "tokens_per_s": 1e4})
        if step % 50 == 0:
            log.write("eval", step, {"nll": 2.0})
            time.sleep(0.2)  # the background thread retries meanwhile
    tracker.log_artifacts([run_dir / "train.csv"])
    log.close()
    tracker.close()
    assert tracker.close_s < 15  # one last probe (connection refused), not MLflow's HTTP retries
    assert tracker.blocking_s - tracker.close_s < 0.5, tracker.blocking_s  # 250 rows queued, none waited on
    err = capsys.readouterr().err
    assert err.count("[ft-ray] warning") == 1, err
    assert f"MLflow tracking at {dead} failed" in err and "training continues" in err
    rows = csv_rows(run_dir / "train.csv")
    assert [int(r["step"]) for r in rows] == list(range(1, 201))
    assert not (run_dir / RUN_ID_FILE).exists()  # no run was ever created


def test_full_queue_drops_instead_of_blocking(tmp_path, capsys):
    cfg = smoke_cfg(tmp_path, "run", f"train.tracking=http://127.0.0.1:{free_port()}")
    tracker = MlflowTracker(queue_size=4, retry_s=(30, 30), close_timeout_s=10)
    tracker.start(cfg, tmp_path / "run")
    t0 = time.perf_counter()
    for step in range(1000):
        tracker.log_metrics(step, {"loss": 1.0, "flag": True, "text": "x", "nan": float("nan")})
    assert time.perf_counter() - t0 < 1.0
    tracker.close()
    assert 0 < tracker.dropped < 1000  # only numbers count, and some rows got through
    assert capsys.readouterr().err.count("[ft-ray] warning") == 1


# ----------------------------------------------------------------------------------------------
# a real tracking server on loopback
# ----------------------------------------------------------------------------------------------


@pytest.mark.timeout(240)
def test_tracker_logs_params_metrics_tags_artifacts_to_a_server(mlflow_server, tmp_path):
    from ft_ray.train.metrics import MetricsWriter

    run_dir = tmp_path / "run"
    cfg = smoke_cfg(tmp_path, "run", f"train.tracking={mlflow_server}", "train.tracking_experiment=server-test")
    tracker = MlflowTracker()
    tracker.start(cfg, run_dir)
    log = MetricsWriter(run_dir, tracker=tracker)
    for step in (2, 4, 6):
        log.write("train", step, {"loss": 10.0 - step, "kl_bits": 0.5, "tokens_per_s": 1e4, "data_wait_frac": 0.01})
    log.write("eval", 6, {"nll": 3.5, "z_gap": 0.2, "iwae": 3.4})
    fake_run_dir(run_dir)
    tracker.log_artifacts(run_artifacts(run_dir, log_weights=False))
    log.close()
    tracker.close()
    run = the_run(mlflow_server, run_dir)
    assert client(mlflow_server).get_experiment(run.info.experiment_id).name == "server-test"
    assert run.info.run_name == "run" and run.info.status == "FINISHED"
    params = run.data.params
    assert params["model.latent_bits"] == "4" and params["model.free_bits"] == "1.0"
    assert params["train.tracking"] == mlflow_server and params["data.seq_len"] == "None"
    assert len(params) > 50  # the whole resolved config
    tags = run.data.tags
    assert (tags["arch"], tags["latent_bits"], tags["kappa_bits"]) == ("free_transformer", "4", "1")
    assert len(tags.get("mlflow.source.git.commit", "")) == 40  # this checkout's commit
    assert history(mlflow_server, run.info.run_id, "loss") == [(2, 8.0), (4, 6.0), (6, 4.0)]
    assert history(mlflow_server, run.info.run_id, "val_nll") == [(6, 3.5)]
    assert {"kl_bits", "tokens_per_s", "data_wait_frac", "val_z_gap", "val_iwae"} <= set(run.data.metrics)
    assert artifacts(mlflow_server, run.info.run_id) == {"config.yaml", "bundle/config.json", "bundle/metrics.json"}

    # resumed with a longer max_steps: the same MLflow run, its history continued
    cfg = smoke_cfg(tmp_path, "run", f"train.tracking={mlflow_server}", "train.tracking_experiment=server-test",
                    "train.max_steps=8")
    tracker = MlflowTracker()
    tracker.start(cfg, run_dir)
    tracker.log_metrics(8, {"loss": 1.0})
    tracker.close()
    again = the_run(mlflow_server, run_dir)
    assert again.info.run_id == run.info.run_id and again.info.status == "FINISHED"
    assert again.data.params["train.max_steps"] == "6"  # MLflow params never change...
    assert again.data.tags["ft_ray.changed_on_resume"] == "train.max_steps: 6 -> 8"  # ...so a tag says it
    assert [s for s, _ in history(mlflow_server, run.info.run_id, "loss")] == [2, 4, 6, 8]


# ----------------------------------------------------------------------------------------------
# the embedded default: a real training run in-process (no Ray), then a resume
# ----------------------------------------------------------------------------------------------


def _train_in_process(cfg, run_dir: Path) -> dict:
    """The training loop as a plain, single-process launch (PlainRuntime, no torch.distributed)."""
    from ft_ray.train.loop import run_training
    from ft_ray.train.plain import _rows
    from ft_ray.train.runtime import PlainRuntime
    from ft_ray.train.trainer import resolve

    cfg = resolve(cfg).cfg  # seq_len from the task
    data = {split: (lambda r, w, b, s=split: _rows(cfg, s, r, w, b)) for split in ("train", "val")}
    return run_training(cfg, PlainRuntime(data, run_dir / "checkpoints"), run_dir)


@pytest.mark.timeout(240)
def test_training_run_logs_to_the_embedded_store_and_resumes_the_same_run(tmp_path):
    run_dir = tmp_path / "emb"
    final = _train_in_process(smoke_cfg(tmp_path, "emb", "train.eval_every=4"), run_dir)
    uri = embedded_store_uri(tmp_path)  # the default, `mlflow`: beside the run directories
    assert (tmp_path / "mlflow.db").is_file()
    run = the_run(uri, run_dir)
    assert client(uri).get_experiment(run.info.experiment_id).name == "ft-ray"
    assert run.info.status == "FINISHED" and run.data.params["train.name"] == "emb"
    train_rows = csv_rows(run_dir / "train.csv")
    losses = [(int(r["step"]), float(r["loss"])) for r in train_rows]
    logged = history(uri, run.info.run_id, "loss")
    assert [s for s, _ in logged] == [s for s, _ in losses] == [2, 4, 6]
    assert [v for _, v in logged] == pytest.approx([v for _, v in losses])
    assert [s for s, _ in history(uri, run.info.run_id, "val_nll")] == [4, 6]
    for key in ("ce", "kl_bits", "tokens_per_s", "data_wait_frac", "grad_norm", "val_z_gap"):
        assert key in run.data.metrics, key
    assert artifacts(uri, run.info.run_id) == {"config.yaml", "bundle/config.json", "bundle/metrics.json"}
    stored = Path(run.info.artifact_uri.removeprefix("file://"))
    assert stored.is_relative_to(tmp_path / "mlartifacts")  # beside the store, not ./mlruns
    assert 0 <= final["tracking_blocking_s"] < 1.0, final  # the loop never waited on the store

    # killed after the step-4 checkpoint: step 6 (logged by the killed attempt) runs and logs again
    shutil.rmtree(run_dir / "checkpoints" / "checkpoint_00000006")
    shutil.rmtree(run_dir / "bundle")
    _train_in_process(smoke_cfg(tmp_path, "emb", "train.eval_every=4"), run_dir)
    again = the_run(uri, run_dir)
    assert again.info.run_id == run.info.run_id and again.info.status == "FINISHED"
    steps = [s for s, _ in history(uri, run.info.run_id, "loss")]
    assert steps == [2, 4, 6, 6]  # MLflow's history is append-only: step 6 twice...
    final_loss = float(csv_rows(run_dir / "train.csv")[-1]["loss"])
    assert again.data.metrics["loss"] == pytest.approx(final_loss)  # ...the run's value is the last one's
    assert len(client(uri).search_runs([run.info.experiment_id])) == 1


# ----------------------------------------------------------------------------------------------
# sweeps: one experiment per sweep (space parsing, without Ray)
# ----------------------------------------------------------------------------------------------


def _space(tmp_path: Path, **changes) -> Path:
    raw = yaml.safe_load((ROOT / "tune_spaces" / "smoke.yaml").read_text())
    raw.update(storage_path=str(tmp_path / "sweeps"), **changes)
    path = tmp_path / "space.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


def test_sweep_gives_every_trial_one_experiment_and_store(tmp_path):
    from ft_ray.tune.space import Resources, load_space, own_trial_settings, resolved_space

    spec = load_space(_space(tmp_path))
    assert spec.tracking == "mlflow"
    cfg = smoke_cfg(tmp_path, "x")
    own_trial_settings(cfg, Resources(), "trial-1", spec.sweep_dir / "trials", spec.tracking)
    assert cfg.train.tracking == embedded_store_uri(spec.sweep_dir)  # the sweep's store, not trials/'
    assert cfg.train.tracking_experiment == spec.name
    own_trial_settings(cfg, Resources(), "trial-1", spec.sweep_dir / "trials", "http://127.0.0.1:5000")
    assert cfg.train.tracking == "http://127.0.0.1:5000"
    # where a sweep is tracked is not what it is: a re-run may move to a server
    assert resolved_space(load_space(_space(tmp_path, tracking="none"))) == resolved_space(spec)
    with pytest.raises(ConfigError, match=r"space.yaml: tracking: expected none, mlflow"):
        load_space(_space(tmp_path, tracking="mlfow"))
    with pytest.raises(ConfigError, match="base.overrides: train.tracking: the sweep sets it"):
        load_space(_space(tmp_path, base={"config": "smoke", "overrides": ["train.tracking=none"]}))


# ----------------------------------------------------------------------------------------------
# Ray: a Ray Train run against the server, and a sweep (the session's cluster)
# ----------------------------------------------------------------------------------------------


@pytest.mark.timeout(300)
def test_ray_train_run_tracks_to_the_server_and_resumes_the_same_run(ray_cluster, mlflow_server, tmp_path):
    """2 workers: only rank 0 logs; the run's metrics at their steps, params and artifacts; a
    re-run with a longer max_steps continues the same MLflow run."""
    from ft_ray.train.trainer import fit

    extra = ["train.num_workers=2", f"train.tracking={mlflow_server}", "train.tracking_experiment=ray-test"]
    result = fit(smoke_cfg(tmp_path, "r", *extra))
    run_dir = tmp_path / "r"
    run = the_run(mlflow_server, run_dir)
    assert run.info.status == "FINISHED" and run.data.params["train.num_workers"] == "2"
    assert [s for s, _ in history(mlflow_server, run.info.run_id, "loss")] == [2, 4, 6]
    assert run.data.metrics["val_nll"] == pytest.approx(result.return_value["val_nll"])
    assert artifacts(mlflow_server, run.info.run_id) == {"config.yaml", "bundle/config.json", "bundle/metrics.json"}
    assert 0 <= result.return_value["tracking_blocking_s"] < 1.0
    assert len(client(mlflow_server).search_runs([run.info.experiment_id])) == 1  # rank 1 logged nothing
    fit(smoke_cfg(tmp_path, "r", *extra, "train.max_steps=8"))
    again = the_run(mlflow_server, run_dir)
    assert again.info.run_id == run.info.run_id
    assert [s for s, _ in history(mlflow_server, run.info.run_id, "loss")] == [2, 4, 6, 8]


@pytest.mark.timeout(420)
def test_sweep_trials_are_runs_of_one_experiment_named_after_the_sweep(ray_cluster, tmp_path):
    from ft_ray.tune.runner import run_sweep

    space = _space(tmp_path, name="tracked", scheduler=None,
                   base={"config": "smoke", "overrides": ["train.max_steps=4", "train.eval_every=2",
                                                          "train.sample_groups=0"]})
    sweep_dir = run_sweep(space)
    uri = embedded_store_uri(sweep_dir)
    experiment = client(uri).get_experiment_by_name("tracked")
    runs = client(uri).search_runs([experiment.experiment_id])
    rows = csv_rows(sweep_dir / "results.csv")
    assert sorted(r.info.run_name for r in runs) == sorted(r["trial"] for r in rows)
    for r in runs:
        assert r.info.status == "FINISHED"
        assert r.data.params["model.free_bits"] in ("0.125", "1.0")
        assert [s for s, _ in history(uri, r.info.run_id, "val_nll")] == [2, 4]
