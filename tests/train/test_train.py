"""Training: schedule, FSDP2 parity, Ray Train vs in-process, fault tolerance, resume, bundles,
and the checks that refuse bad input before any worker starts."""

from __future__ import annotations

import csv
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp

from ft_ray.bundle import load_bundle, write_bundle
from ft_ray.cluster import free_port
from ft_ray.config import Config, ConfigError, ModelConfig, load_config
from ft_ray.model import BaselineTransformer, FreeTransformer
from ft_ray.train.checkpoint import full_state_dict
from ft_ray.train.optim import lr_at, param_groups

ROOT = Path(__file__).resolve().parents[2]
SMOKE = ROOT / "jobs" / "configs" / "smoke.yaml"


def smoke_overrides(tmp: Path, name: str, *overrides: str) -> list[str]:
    return [f"train.storage_path={tmp}", f"train.name={name}", "train.max_steps=6", "train.checkpoint_every=2",
            "train.log_every=2", "train.eval_every=100", "train.sample_groups=0", "data.batch_size=4", *overrides]


def smoke_cfg(tmp: Path, name: str, *overrides: str) -> Config:
    return load_config(SMOKE, smoke_overrides(tmp, name, *overrides))


def max_param_diff(a: torch.nn.Module, b: torch.nn.Module) -> float:
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    return max((sa[k].float() - sb[k].float()).abs().max().item() for k in sa)


# ----------------------------------------------------------------------------------------------
# optimiser and schedule
# ----------------------------------------------------------------------------------------------


def test_lr_schedule_warmup_then_one_cosine_decay():
    base, warm, total, low = 1e-3, 10, 110, 1e-4
    lrs = [lr_at(s, base, warm, total, low) for s in range(200)]
    assert lrs[0] == pytest.approx(base / warm)
    assert lrs[warm - 1] == pytest.approx(base)  # linear warmup reaches the peak
    assert all(b > a for a, b in zip(lrs[:warm - 1], lrs[1:warm]))
    decay = lrs[warm:total + 1]
    assert all(b <= a for a, b in zip(decay, decay[1:]))  # a single decay, never periodic
    assert lrs[warm + 50] == pytest.approx(low + (base - low) * 0.5)  # the cosine's midpoint
    assert lrs[total] == pytest.approx(low) and lrs[199] == pytest.approx(low)  # flat at min_lr after


def test_weight_decay_only_on_matrices():
    model = FreeTransformer(ModelConfig(vocab_size=32, hidden_dim=32, num_layers=2, num_heads=2, latent_bits=3))
    decay, no_decay = param_groups(model, 0.1)
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    assert all(p.dim() >= 2 for p in decay["params"]) and all(p.dim() < 2 for p in no_decay["params"])
    assert any(p is model.encoder.zeta for p in no_decay["params"])
    assert any(p is model.post_sampler.weight for p in decay["params"])


def test_score_group_counts_valid_samples_and_start_agreement():
    from ft_ray.eval.validation import score_group

    def body(start: int) -> str:
        return "_" * start + "K" * 8 + "_" * (56 - start)

    valid, agree = score_group([body(5), body(5), body(10), "K" * 64], "K")
    assert valid == 0.75 and agree == pytest.approx(2 / 3)  # 3 valid bodies, 2 of them start at 5
    assert score_group([body(3), "_" * 64], "K") == (0.5, None)  # one valid body: no agreement


def test_metrics_of_a_resumed_run_keep_one_row_per_step(tmp_path):
    from ft_ray.train.metrics import MetricsWriter

    log = MetricsWriter(tmp_path)
    for step in (2, 4, 6):
        log.write("train", step, {"loss": float(step)})
    log.write("eval", 6, {"nll": 1.0})
    log.close()
    resumed = MetricsWriter(tmp_path, resume_step=4)  # the checkpoint was at step 4; 5-6 run again
    resumed.write("train", 6, {"loss": 60.0})
    resumed.close()
    rows = (tmp_path / "train.csv").read_text().splitlines()
    assert rows == ["step,loss", "2,2.0", "4,4.0", "6,60.0"]
    assert (tmp_path / "eval.csv").read_text().splitlines() == ["step,nll"]


# ----------------------------------------------------------------------------------------------
# FSDP2 on 2 gloo ranks equals the unsharded model
# ----------------------------------------------------------------------------------------------



def _fsdp_worker(rank: int, world: int, port: int, result_dir: str) -> None:
    import torch.distributed as dist

    from ft_ray.train.parallel import parallelize

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    torch.set_num_threads(1)
    try:
        cfg = ModelConfig(vocab_size=40, hidden_dim=32, num_layers=4, num_heads=4, num_key_value_heads=2,
                          latent_bits=4, max_seq_len=32)
        torch.manual_seed(0)
        ref = FreeTransformer(cfg)
        torch.manual_seed(0)
        sharded = parallelize(FreeTransformer(cfg), world, torch.device("cpu"), "fp32")
        g = torch.Generator().manual_seed(1)
        tokens = torch.randint(0, 40, (2, 13), generator=g)
        z = torch.randint(0, 16, (2, 12), generator=g)
        losses = []
        for model in (ref, sharded):
            logits = model(tokens[:, :-1], z=z).logits
            loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), tokens[:, 1:].flatten())
            loss.backward()
            losses.append(logits.detach())
        torch.testing.assert_close(losses[1], losses[0], rtol=1e-5, atol=1e-6)
        ref_grads = dict(ref.named_parameters())
        checked = 0
        for name, p in sharded.named_parameters():
            if p.grad is None:
                assert ref_grads[name].grad is None, name
                continue
            full = p.grad.full_tensor()  # FSDP2 averages the (identical) rank gradients
            torch.testing.assert_close(full, ref_grads[name].grad, rtol=1e-5, atol=1e-6, msg=name)
            checked += 1
        assert checked > 20
        state = full_state_dict(sharded)  # collective; with CPU offload only rank 0 receives it
        if rank == 0:
            for k, v in ref.state_dict().items():
                torch.testing.assert_close(state[k], v, msg=k)
        else:
            assert state == {}
        Path(result_dir, f"ok{rank}").write_text(str(checked))
    finally:
        dist.destroy_process_group()


@pytest.mark.timeout(120)
def test_fsdp2_forward_backward_equals_unsharded(tmp_path):
    mp.spawn(_fsdp_worker, args=(2, free_port(), str(tmp_path)), nprocs=2, join=True)
    assert (tmp_path / "ok0").exists() and (tmp_path / "ok1").exists()


# ----------------------------------------------------------------------------------------------
# bundles
# ----------------------------------------------------------------------------------------------


def test_bundle_round_trip_same_logits(tmp_path):
    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=50, hidden_dim=32, num_layers=2, num_heads=2, latent_bits=4, tie_embeddings=True)
    model = FreeTransformer(cfg).eval()
    out = write_bundle(tmp_path / "bundle", model.state_dict(), cfg, {"val_nll": 1.5})
    assert not list(tmp_path.glob(".bundle.tmp-*"))  # the temporary directory was renamed away
    loaded, loaded_cfg, metrics = load_bundle(out)
    assert loaded_cfg == cfg and metrics == {"val_nll": 1.5} and isinstance(loaded, FreeTransformer)
    tokens = torch.randint(0, 50, (2, 9))
    z = torch.randint(0, 16, (2, 9))
    with torch.no_grad():
        torch.testing.assert_close(loaded(tokens, z=z).logits, model(tokens, z=z).logits, rtol=0, atol=0)


def test_bundle_write_is_atomic_and_incomplete_bundle_refused(tmp_path):
    cfg = ModelConfig(arch="baseline", vocab_size=20, hidden_dim=16, num_layers=2, num_heads=2)
    model = BaselineTransformer(cfg)
    write_bundle(tmp_path / "b", model.state_dict(), cfg, {"a": 1.0})
    with pytest.raises(TypeError):  # a failure half-way leaves the previous bundle intact
        write_bundle(tmp_path / "b", model.state_dict(), cfg, {"a": object()})
    assert load_bundle(tmp_path / "b")[2] == {"a": 1.0}
    assert not [p for p in tmp_path.iterdir() if p.name != "b"]
    (tmp_path / "b" / "metrics.json").unlink()
    with pytest.raises(FileNotFoundError, match="metrics.json"):
        load_bundle(tmp_path / "b")


# ----------------------------------------------------------------------------------------------
# Ray Train (one shared local cluster)
# ----------------------------------------------------------------------------------------------


@pytest.mark.timeout(240)
def test_downstream_tasks_are_scored_at_each_evaluation_and_reported(ray_cluster, tmp_path):
    """train.eval_tasks: lm-eval on the offline suite at each evaluation, in eval.csv and in the
    run's result as eval/<task>/<metric> (what a sweep may optimise)."""
    from ft_ray.eval.tasks import TASK_METRICS
    from ft_ray.train.trainer import fit

    result = fit(smoke_cfg(tmp_path, "downstream", "train.num_workers=0", "train.max_steps=2", "train.eval_every=1",
                           "train.eval_tasks=[ftray_arith_choice,ftray_letters]", "train.eval_task_limit=4",
                           "train.eval_task_num_plans=2"))
    names = [f"eval/{t}/{m}" for t in ("ftray_arith_choice", "ftray_letters") for m in TASK_METRICS[t]]
    final = result.return_value
    assert all(0 <= final[n] <= 1 for n in names), final
    rows = list(csv.DictReader((tmp_path / "downstream" / "eval.csv").open()))
    assert [r["step"] for r in rows] == ["1", "2"] and all(n in rows[0] for n in names)
    assert 0 <= float(rows[-1]["eval/ftray_arith_choice/acc"]) <= 1


def test_two_worker_step_equals_in_process_step(ray_cluster, tmp_path):
    """8 sequences, one step: 2 workers x 4 rows under Ray Train (FSDP2) vs the same loop
    in-process (local mode) on all 8 rows: the same parameters."""
    from ft_ray.train.trainer import fit

    common = ["model.arch=baseline", "data.num_train_sequences=8", "train.max_steps=1"]
    fit(smoke_cfg(tmp_path, "ray2", *common, "train.num_workers=2", "data.batch_size=4"))
    fit(smoke_cfg(tmp_path, "local", *common, "train.num_workers=0", "data.batch_size=8"))
    two, _, m2 = load_bundle(tmp_path / "ray2" / "bundle")
    one, _, m1 = load_bundle(tmp_path / "local" / "bundle")
    assert m2["step"] == m1["step"] == 1
    assert m2["loss"] == pytest.approx(m1["loss"], rel=1e-5)
    torch.manual_seed(0)
    fresh = BaselineTransformer(two.cfg)
    assert max_param_diff(fresh, one) > 1e-4  # the step changed the weights...
    assert max_param_diff(two, one) < 1e-5  # ...identically in both launches


@pytest.fixture(scope="module")
def uninterrupted(ray_cluster, tmp_path_factory):
    from ft_ray.train.trainer import fit

    tmp = tmp_path_factory.mktemp("runs")
    result = fit(smoke_cfg(tmp, "a", "train.num_workers=2"))
    return tmp, result


@pytest.mark.timeout(300)
def test_worker_killed_mid_run_restarts_from_checkpoint_with_same_result(uninterrupted, tmp_path):
    from ft_ray.train.trainer import fit

    base_dir, base = uninterrupted
    marker = tmp_path / "killed"
    result = fit(smoke_cfg(tmp_path, "c", "train.num_workers=2", "train.max_failures=1"),
                 kill_at=f"3:1:{marker}")
    assert marker.read_text().startswith("killed rank 1 at step 3")  # the kill really happened
    assert result.return_value["step"] == 6
    a = load_bundle(base_dir / "a" / "bundle")[0]
    c = load_bundle(tmp_path / "c" / "bundle")[0]
    # restarted from the step-2 checkpoint with the same data position and RNG: bit-identical
    assert max_param_diff(a, c) == 0.0
    steps = [int(line.split(",")[0]) for line in (tmp_path / "c" / "train.csv").read_text().splitlines()[1:]]
    assert steps == [2, 4, 6]  # step 2 logged once before the kill, then 4 and 6 after the restart


@pytest.mark.timeout(300)
def test_driver_killed_then_rerun_resumes_to_the_same_result(uninterrupted, tmp_path):
    """`python -m jobs.train` joined to the session cluster is SIGKILLed once its first checkpoint
    is registered; running the same name again resumes from it and ends bit-identical to the
    uninterrupted run (runs before the test below, which trains run `a` further)."""
    import signal
    import time

    import ray

    from ft_ray.train.trainer import fit

    base_dir, _ = uninterrupted
    overrides = smoke_overrides(tmp_path, "d", "train.num_workers=2")
    env = {**os.environ, "RAY_ADDRESS": ray.get_runtime_context().gcs_address}
    with (tmp_path / "driver.log").open("w") as log:
        driver = subprocess.Popen([sys.executable, "-m", "jobs.train", "--config", "smoke",
                                   *(x for o in overrides for x in ("--set", o))], cwd=ROOT, env=env,
                                  stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    run_dir = tmp_path / "d"
    try:
        deadline = time.monotonic() + 180
        while not (run_dir / "checkpoint_manager_snapshot.json").exists():  # Ray registered a checkpoint
            assert driver.poll() is None and time.monotonic() < deadline, (tmp_path / "driver.log").read_text()[-3000:]
            time.sleep(0.05)
    finally:
        os.killpg(driver.pid, signal.SIGKILL)
        driver.wait(timeout=30)
    deadline = time.monotonic() + 120  # the driver's Train controller and workers go with it
    while ray.available_resources().get("CPU", 0) < ray.cluster_resources()["CPU"]:
        assert time.monotonic() < deadline, "the killed driver's workers still hold CPUs"
        time.sleep(0.5)
    assert not (run_dir / "bundle").exists()  # killed mid-run, not after it finished
    cfg = load_config(SMOKE, overrides)
    result = fit(cfg)
    assert result.return_value["step"] == 6
    steps = [int(line.split(",")[0]) for line in (run_dir / "train.csv").read_text().splitlines()[1:]]
    assert steps == [2, 4, 6]  # resumed; a row logged after the checkpoint (then lost) is not repeated
    a = load_bundle(base_dir / "a" / "bundle")[0]
    d = load_bundle(run_dir / "bundle")[0]
    assert max_param_diff(a, d) == 0.0


@pytest.mark.timeout(300)
def test_damaged_newest_checkpoint_resumes_from_the_intact_one(uninterrupted, tmp_path, capsys):
    """4 KB flipped inside the newest checkpoint's shard: the re-run names it, resumes from the
    older intact checkpoint and ends bit-identical to the uninterrupted run."""
    from ft_ray.train.checkpoint import checkpoint_step
    from ft_ray.train.trainer import fit

    base_dir, _ = uninterrupted
    fit(smoke_cfg(tmp_path, "e", "train.num_workers=2", "train.max_steps=4"))
    newest = max((p for p in (tmp_path / "e").glob("checkpoint_*") if p.is_dir()), key=checkpoint_step)
    assert checkpoint_step(newest) == 4
    shard = next(newest.glob("*.distcp"))
    data = bytearray(shard.read_bytes())
    data[100:4196] = bytes(b ^ 0xFF for b in data[100:4196])
    shard.write_bytes(bytes(data))
    result = fit(smoke_cfg(tmp_path, "e", "train.num_workers=2"))
    assert result.return_value["step"] == 6
    assert f"checkpoint {newest} is damaged ({shard.name} changed since it was written" in capsys.readouterr().err
    steps = [int(line.split(",")[0]) for line in (tmp_path / "e" / "train.csv").read_text().splitlines()[1:]]
    assert steps == [2, 4, 6]  # resumed at step 2: step 4 was trained again
    a = load_bundle(base_dir / "a" / "bundle")[0]
    e = load_bundle(tmp_path / "e" / "bundle")[0]
    assert max_param_diff(a, e) == 0.0


@pytest.mark.timeout(240)
def test_rerun_same_name_continues_from_last_checkpoint(uninterrupted):
    from ft_ray.train.trainer import fit

    base_dir, base = uninterrupted
    assert base.return_value["step"] == 6
    result = fit(smoke_cfg(base_dir, "a", "train.num_workers=2", "train.max_steps=8", "train.log_every=1"))
    assert result.return_value["step"] == 8
    rows = (base_dir / "a" / "train.csv").read_text().splitlines()
    header = rows[0].split(",")
    steps = {int(r.split(",")[0]): dict(zip(header, r.split(","))) for r in rows[1:]}
    assert list(steps) == [2, 4, 6, 7, 8]  # steps 7-8 only: it resumed
    # the LR stays where the 6-step schedule ended (min_lr 3e-4) instead of climbing back up the
    # 8-step curve (9.75e-4 at step 7)
    assert float(steps[7]["lr"]) == pytest.approx(3e-4) and float(steps[8]["lr"]) == pytest.approx(3e-4)
    bundle = base_dir / "a" / "bundle" / "model.safetensors"
    stamp = bundle.stat().st_mtime_ns
    again = fit(smoke_cfg(base_dir, "a", "train.num_workers=2", "train.max_steps=8"))
    assert again.return_value["step"] == 8 and again.return_value["loss"] == result.return_value["loss"]
    assert len((base_dir / "a" / "train.csv").read_text().splitlines()) == 6  # a finished run trains nothing
    assert bundle.stat().st_mtime_ns == stamp


def test_resuming_a_run_as_another_model_is_refused_before_anything_runs(uninterrupted):
    from ft_ray.train.trainer import fit

    base_dir, _ = uninterrupted
    before = {p: p.stat().st_mtime_ns for p in (base_dir / "a").rglob("*")}
    for change in ("model.arch=baseline", "model.num_heads=2", "data.batch_size=2"):
        with pytest.raises(ConfigError, match=f"train.name: {base_dir / 'a'} holds checkpoints of another"):
            fit(smoke_cfg(base_dir, "a", "train.num_workers=2", change))
    assert {p: p.stat().st_mtime_ns for p in (base_dir / "a").rglob("*")} == before


@pytest.mark.parametrize("overrides, match", [
    (["train.cpus_per_worker=1.5"], "train.cpus_per_worker: .*2 workers x 1.5 CPU = 3 CPU, the cluster has 2"),
    (["train.cpus_per_worker=1"], "train.cpus_per_worker: .*Ray Data's tasks need 1"),
    (["train.use_gpu=true"], "train.use_gpu: .*2 workers x 1 GPU = 2 GPU, the cluster has 0"),
])
def test_resources_the_cluster_never_has_are_refused_at_once(ray_cluster, tmp_path, overrides, match):
    from ft_ray.train.trainer import fit

    with pytest.raises(ConfigError, match=match):
        fit(smoke_cfg(tmp_path, "never", "train.num_workers=2", *overrides))
    assert not (tmp_path / "never").exists()


def test_smoke_run_metrics_are_finite(uninterrupted):
    _, result = uninterrupted
    final = result.return_value
    for key in ("loss", "ce", "kl", "kl_penalty", "lr", "grad_norm", "tokens_per_s", "step_ms",
                "data_wait_frac", "val_nll", "val_z_gap"):
        assert math.isfinite(final[key]), key
    assert final["val_nll"] >= final["val_ce_post"]  # the ELBO adds the KL to the leaky CE


# ----------------------------------------------------------------------------------------------
# bad input: refused before any worker starts
# ----------------------------------------------------------------------------------------------


def test_unknown_preset_is_a_one_line_error():
    proc = subprocess.run([sys.executable, "-m", "jobs.train", "--config", "no-such-preset"], cwd=ROOT,
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2
    assert "unknown preset 'no-such-preset'" in proc.stderr and "smoke" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_storage_path_not_writable(tmp_path):
    from ft_ray.train.trainer import resolve

    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    with pytest.raises(ConfigError, match="train.storage_path"):
        resolve(smoke_cfg(blocker, "x"))
    with pytest.raises(ConfigError, match="train.storage_path.*not a URI"):
        smoke_cfg("s3://bucket/runs", "x")  # would silently become a local ./s3:/bucket directory


def test_config_that_does_not_fit_the_data(tmp_path):
    from ft_ray.data.errors import DataError
    from ft_ray.train.trainer import resolve

    with pytest.raises(DataError, match="model.vocab_size=16"):
        resolve(smoke_cfg(tmp_path, "x", "model.vocab_size=16"))
    with pytest.raises(DataError, match="model.max_seq_len=32"):
        resolve(smoke_cfg(tmp_path, "x", "model.max_seq_len=32"))
    with pytest.raises(DataError, match="data.seq_len=99"):
        resolve(smoke_cfg(tmp_path, "x", "data.seq_len=99"))
