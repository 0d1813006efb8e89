"""The Ray workflow end to end on a real multi-node cluster on this machine: `ray start --head`
with cluster-fake.yaml's autoscaler (its own ports and process group, a 1-CPU head), a smoke
training job sent with `ray job submit --working-dir` that needs more CPUs than the head has (the
autoscaler adds a worker node), `serve deploy serve_apps/config.yaml` of the job's bundle queried
over HTTP, and the idle worker node removed again. The training reads shards that an earlier
`jobs.prepare_data` job wrote; a corpus prepared as a Ray Data job on both nodes is trained on
too. Only this cluster's processes are stopped."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import sysconfig
import tempfile
import threading
import time
import urllib.error
from pathlib import Path

import pytest
import yaml

from ft_ray.cluster import free_port
from ft_ray.serve.client import get_json, post_json

ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent  # the venv's `ray`, `serve` and `python`
IDLE_TIMEOUT_MIN = 0.25  # cluster-fake.yaml says 1 minute; the test waits 15 s instead

pytestmark = pytest.mark.timeout(900)  # includes the module fixtures: head, data job, train job


def _cli(*args: str, timeout: float = 120, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([str(BIN / args[0]), *args[1:]], capture_output=True, text=True, timeout=timeout,
                          env=env, cwd=ROOT)


def _wait(what: str, check, timeout: float, every: float = 1.0):
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")
        time.sleep(every)


class Cluster:
    """A fake multi-node cluster: one `ray start --head --block` in its own process group; the
    autoscaler (a child of it) starts and stops the worker nodes' raylets."""

    def __init__(self, tmp: Path):
        self.tmp = tmp
        self.gcs_port, self.dashboard_port = free_port(), free_port()
        self.address = f"http://127.0.0.1:{self.dashboard_port}"
        fake = yaml.safe_load((ROOT / "cluster-fake.yaml").read_text())
        import ray

        self.node_ip = ray.util.get_node_ip_address()  # what `ray start` advertises for this host
        fake["provider"]["gcs_address"] = f"{self.node_ip}:{self.gcs_port}"  # fake nodes join our GCS
        fake["idle_timeout_minutes"] = IDLE_TIMEOUT_MIN
        fake["max_workers"] = fake["available_node_types"]["ray.worker.gpu"]["max_workers"] = 1  # 2 cores here
        (tmp / "fake.yaml").write_text(yaml.safe_dump(fake))
        head_cpus = fake["available_node_types"][fake["head_node_type"]]["resources"]["CPU"]
        self.env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}  # the head joins nothing
        self.env.update(PATH=f"{BIN}:{os.environ['PATH']}", RAY_FAKE_CLUSTER="1", AUTOSCALER_UPDATE_INTERVAL_S="1",
                        RAY_AUTH_MODE="disabled", RAY_USAGE_STATS_ENABLED="0")
        self.log = (tmp / "head.log").open("w")
        self.proc = subprocess.Popen(
            [str(BIN / "ray"), "start", "--head", "--block", f"--port={self.gcs_port}",
             f"--num-cpus={head_cpus}", "--num-gpus=0", f"--dashboard-port={self.dashboard_port}",
             f"--ray-client-server-port={free_port()}", f"--dashboard-agent-listen-port={free_port()}",
             f"--temp-dir={tmp / 'ray'}", f"--autoscaling-config={tmp / 'fake.yaml'}"],
            env=self.env, stdout=self.log, stderr=subprocess.STDOUT, start_new_session=True, cwd=tmp)
        self.client_env = {**self.env, "RAY_ADDRESS": self.address}
        self.max_nodes = 1
        self._stop = threading.Event()
        try:
            _wait("the head's dashboard", self._dashboard_up, timeout=120)
        except AssertionError:
            self.stop()
            raise AssertionError(f"head did not start:\n{(tmp / 'head.log').read_text()[-3000:]}") from None
        threading.Thread(target=self._watch_nodes, daemon=True).start()

    def _dashboard_up(self) -> bool:
        assert self.proc.poll() is None, "ray start --head exited"
        try:
            get_json(f"{self.address}/api/version", timeout_s=5)
            return True
        except (urllib.error.URLError, ConnectionError, OSError):
            return False

    def alive_nodes(self) -> int:
        nodes = get_json(f"{self.address}/api/v0/nodes?limit=100", timeout_s=10)["data"]["result"]["result"]
        return sum(n["state"] == "ALIVE" for n in nodes)

    def _watch_nodes(self) -> None:
        while not self._stop.is_set():
            try:
                self.max_nodes = max(self.max_nodes, self.alive_nodes())
            except (urllib.error.URLError, OSError, KeyError):
                pass
            self._stop.wait(1.0)

    def stop(self) -> None:
        """Stop this cluster only: the head's process group, then any raylet or worker of ours
        that outlived it (found by this cluster's own temp dir or GCS port)."""
        self._stop.set()
        try:
            os.killpg(self.proc.pid, signal.SIGTERM)
            self.proc.wait(timeout=10)
        except (ProcessLookupError, subprocess.TimeoutExpired):
            pass
        _kill(self.proc.pid)  # the GCS and the autoscaler can outlive a SIGTERM of `ray start --block`
        marks = (str(self.tmp / "ray"), f"{self.node_ip}:{self.gcs_port}")
        for pid_dir in Path("/proc").iterdir():
            if not pid_dir.name.isdigit():
                continue
            try:
                cmd = (pid_dir / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            except OSError:
                continue
            if any(m in cmd for m in marks):
                _kill(int(pid_dir.name), group=False)
        self.log.close()


def _kill(pid: int, group: bool = True) -> None:
    try:
        os.killpg(pid, signal.SIGKILL) if group else os.kill(pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


@pytest.fixture(scope="module")
def cluster():
    # a short path: Ray's Unix sockets live under --temp-dir and a socket path has ~107 bytes at most
    tmp = Path(tempfile.mkdtemp(prefix="ftray-", dir="/tmp"))
    c = Cluster(tmp)
    yield c
    c.stop()
    shutil.rmtree(tmp, ignore_errors=True)


def _submit(cluster: Cluster, name: str, *entrypoint: str, timeout: float = 400) -> tuple[str, str]:
    """`ray job submit --working-dir <repo>` of `python -m jobs.<...>`; waits for the end and
    returns (status, logs)."""
    job_id = f"ft-ray-{name}-{os.getpid()}"
    submit = _cli("ray", "job", "submit", "--no-wait", "--submission-id", job_id, "--working-dir", str(ROOT),
                  "--", "python", "-m", *entrypoint, env=cluster.client_env)
    assert submit.returncode == 0, submit.stdout + submit.stderr

    def finished():  # the job REST API the CLI itself uses
        status = get_json(f"{cluster.address}/api/jobs/{job_id}", timeout_s=10)["status"]
        return status if status in ("SUCCEEDED", "FAILED", "STOPPED") else None

    status = _wait(f"job {job_id}", finished, timeout=timeout, every=3)
    return status, _cli("ray", "job", "logs", job_id, env=cluster.client_env).stdout


@pytest.fixture(scope="module")
def trained_run(cluster):
    """Two jobs: letter-task shards (jobs.prepare_data), then the smoke training on them. 2
    workers x 1 CPU do not fit the 1-CPU head, so training can only finish once the autoscaler
    has added a worker node."""
    data, runs = cluster.tmp / "data", cluster.tmp / "runs"
    status, logs = _submit(cluster, "data", "jobs.prepare_data", "synthetic", "--num-sequences", "2000",
                           "--out", str(data), timeout=120)
    assert status == "SUCCEEDED" and f"wrote {data}: train 2000 sequences" in logs, logs[-3000:]
    status, logs = _submit(cluster, "train", "jobs.train", "--config", "smoke", "--set", "train.cpus_per_worker=1",
                           "--set", "data.source=shards", "--set", f"data.path={data}",
                           "--set", "train.eval_every=20", "--set", f"train.storage_path={runs}",
                           "--set", "train.name=e2e", timeout=300)
    return status, logs, runs / "e2e"


def test_job_submit_trains_on_autoscaled_nodes(cluster, trained_run):
    status, logs, run_dir = trained_run
    assert status == "SUCCEEDED", logs[-4000:]
    assert "joined the Ray cluster" in logs and f"outputs: {run_dir}" in logs
    # training workers run at niceness 0, not Ray's default 15 for worker processes
    assert "world 2, fp32, from scratch, niceness 0" in logs
    assert "Reporting training result" not in logs  # Train's per-report INFO line is quieted
    assert cluster.max_nodes >= 2  # the head alone (1 CPU) cannot hold 2 x 1-CPU workers
    metrics = json.loads((run_dir / "bundle" / "metrics.json").read_text())
    assert metrics["step"] == 20  # the smoke preset's max_steps: the run finished


def test_serve_deploy_of_the_jobs_bundle(cluster, trained_run):
    _, _, run_dir = trained_run
    models = cluster.tmp / "models"
    shutil.copytree(run_dir / "bundle", models / "smoke")
    serve_cfg = yaml.safe_load((ROOT / "serve_apps" / "config.yaml").read_text())
    port = free_port()
    serve_cfg["proxy_location"] = "HeadOnly"  # fake nodes share this host's ports: one proxy only
    serve_cfg["http_options"].update(host="127.0.0.1", port=port)
    serve_cfg["applications"][0]["args"]["models_dir"] = str(models)
    (cluster.tmp / "serve.yaml").write_text(yaml.safe_dump(serve_cfg))
    deploy = _cli("serve", "deploy", str(cluster.tmp / "serve.yaml"), "--address", cluster.address,
                  env=cluster.client_env)
    assert deploy.returncode == 0, deploy.stdout + deploy.stderr
    url = f"http://127.0.0.1:{port}"

    def healthy():
        try:
            return get_json(f"{url}/healthz", timeout_s=5)["status"] == "ok"
        except (urllib.error.URLError, OSError):
            return False

    _wait("the deployed app's /healthz", healthy, timeout=180, every=2)
    assert [m["id"] for m in get_json(f"{url}/v1/models")["data"]] == ["smoke"]
    body = {"model": "smoke", "prompt": "K>", "max_tokens": 20, "n": 3, "seed": 1,
            "plan": {"seed": 2, "shared": True}}
    a, b = post_json(f"{url}/v1/completions", body), post_json(f"{url}/v1/completions", body)
    assert a["usage"]["completion_tokens"] > 0
    assert [c["text"] for c in a["choices"]] == [c["text"] for c in b["choices"]]  # seeded: reproducible
    assert len({tuple(c["plan"]["codes"]) for c in a["choices"]}) == 1  # one shared plan
    shutdown = _cli("serve", "shutdown", "-y", "--address", cluster.address, env=cluster.client_env)
    assert shutdown.returncode == 0, shutdown.stdout + shutdown.stderr


def test_idle_worker_nodes_are_removed(cluster, trained_run):
    assert cluster.max_nodes >= 2
    _wait("the autoscaler to remove the idle worker nodes", lambda: cluster.alive_nodes() == 1,
          timeout=IDLE_TIMEOUT_MIN * 60 + 120, every=2)


def test_corpus_job_writes_shards_on_several_nodes_and_training_streams_them(cluster):
    """`jobs.prepare_data corpus --workers 3` on the 1-CPU head: the job waits for the autoscaler's
    node, tokenizes on both nodes and packs buckets there; the tasks report which node wrote each
    shard. Then the smoke training streams the shards."""
    data, runs = cluster.tmp / "corpus", cluster.tmp / "runs"
    source = str(Path(sysconfig.get_paths()["stdlib"]) / "email" / "**" / "*.py")
    status, logs = _submit(cluster, "corpus", "jobs.prepare_data", "corpus", "--source", source,
                           "--tokenizer", "bytes", "--seq-len", "64", "--val-fraction", "0.2", "--buckets", "6",
                           "--workers", "3", "--out", str(data), timeout=300)
    assert status == "SUCCEEDED" and f"wrote {data}: train " in logs, logs[-4000:]
    nodes = re.search(r"shards written on (\d+) node\(s\): (.*)", logs)
    assert nodes and int(nodes.group(1)) >= 2, logs[-4000:]  # from the pack tasks' own metadata
    status, logs = _submit(cluster, "train-corpus", "jobs.train", "--config", "smoke",
                           "--set", "train.cpus_per_worker=1", "--set", "data.source=shards",
                           "--set", f"data.path={data}", "--set", "model.vocab_size=259",
                           "--set", "train.eval_every=20", "--set", f"train.storage_path={runs}",
                           "--set", "train.name=corpus", timeout=300)
    assert status == "SUCCEEDED", logs[-4000:]
    assert json.loads((runs / "corpus" / "bundle" / "metrics.json").read_text())["step"] == 20
