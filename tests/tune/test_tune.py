"""Sweeps: the smoke space end to end on the session's Ray cluster with ASHA, a re-run that
resumes instead of retraining, every validation error of a space file, the stored space that
refuses an edited re-run, and the results of incomplete sweeps (without Ray: fake trials)."""

from __future__ import annotations

import csv
import math
from pathlib import Path
from types import SimpleNamespace

import pytest
import yaml

from ft_ray.cli import main as cli_main
from ft_ray.config import ConfigError, load_config, to_dict
from ft_ray.tune.space import (
    TRIAL_OWNED,
    Resources,
    check_space_record,
    load_space,
    own_trial_settings,
    write_space_record,
)

ROOT = Path(__file__).resolve().parents[2]


def _space(tmp_path: Path, **changes) -> Path:
    raw = yaml.safe_load((ROOT / "tune_spaces" / "smoke.yaml").read_text())
    raw["storage_path"] = str(tmp_path / "sweeps")
    for key, value in changes.items():
        if value is None:
            raw.pop(key, None)
        else:
            raw[key] = value
    path = tmp_path / "space.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


@pytest.mark.timeout(420)
def test_smoke_sweep_then_rerun_resumes(ray_cluster, tmp_path, capsys):
    from ft_ray.tune.runner import run_sweep

    space = _space(tmp_path)
    sweep_dir = run_sweep(space)
    assert "no stored space" not in capsys.readouterr().out  # a new sweep is not taken for an old one
    rows = list(csv.DictReader((sweep_dir / "results.csv").open()))
    assert len(rows) == 2 and {r["model.free_bits"] for r in rows} == {"0.125", "1.0"}
    assert "val_ce" not in rows[0] and all(r["val_ce_post (leaky)"] for r in rows)  # FT rows: the posterior CE
    assert (sweep_dir / "space.json").is_file()
    for r in rows:
        assert math.isfinite(float(r["val_nll"])) and math.isfinite(float(r["kl_bits"]))
        # ASHA (grace 2, max_t 4, factor 2) may stop the worse trial at its second evaluation
        assert (int(r["evaluations"]), r["status"]) in {(4, "ok"), (2, "stopped early (ASHA)")}
    finished = [r for r in rows if r["status"] == "ok"]
    assert finished
    assert (sweep_dir / "results.md").read_text().count("| trial-") == 2
    assert (sweep_dir / "nll_kl_vs_kappa.png").stat().st_size > 5000
    best = min(finished, key=lambda r: float(r["val_nll"]))
    assert (sweep_dir / "best_bundle" / "model.safetensors").read_bytes() == (
        sweep_dir / "trials" / best["trial"] / "bundle" / "model.safetensors").read_bytes()
    bundles = {p: p.stat().st_mtime_ns for p in (sweep_dir / "trials").glob("*/bundle/model.safetensors")}
    assert len(bundles) == len(finished)
    run_sweep(space)  # the same name again: restored, finished trials are not trained again
    assert {p: p.stat().st_mtime_ns for p in bundles} == bundles
    assert len(list(csv.DictReader((sweep_dir / "results.csv").open()))) == 2


@pytest.mark.parametrize("change, key", [
    ({"bogus": 1}, "bogus"),
    ({"space": {"model.nope": {"grid": [1, 2]}}}, "model.nope"),
    ({"space": {"model.latent_bits": {"grid": [4, 0]}}}, "latent_bits"),
    ({"space": {"model.free_bits": {"gaussian": [0, 1]}}}, "space.model.free_bits"),
    ({"space": {"optim.lr": {"loguniform": [0, 1]}}}, "space.optim.lr.loguniform"),
    ({"space": {"optim.lr": {"uniform": [0.1, 0.01]}}}, "space.optim.lr.uniform"),
    ({"metric": "val_accuracy"}, "metric"),
    ({"mode": "best"}, "mode"),
    ({"base": {"config": "no-such-preset"}}, "base.config"),
    ({"scheduler": {"type": "hyperband"}}, "scheduler"),
    ({"resources": {"gpus": 1}}, "resources"),
    # sampled values that would fail in every trial, not at validation
    ({"space": {"model.latent_bits": {"uniform": [4, 16]}}}, "space.model.latent_bits.uniform"),
    ({"space": {"model.latent_bits": {"loguniform": [4, 16]}}}, "space.model.latent_bits.loguniform"),
    ({"space": {"model.latent_bits": {"randint": [4, 15.5]}}}, "space.model.latent_bits.randint"),
    ({"space": {"optim.lr": {"uniform": ["a", 1]}}}, "space.optim.lr.uniform"),
    # keys every trial gets from the sweep itself
    ({"space": {"train.num_workers": {"grid": [1, 2]}}}, "space.train.num_workers"),
    ({"space": {"train.name": {"choice": ["a", "b"]}}}, "space.train.name"),
    ({"space": {"train.log_every": {"randint": [1, 5]}}}, "space.train.log_every"),
    ({"reference_arms": [{"train.use_gpu": True}]}, "reference_arms[0].train.use_gpu"),
    ({"reference_arms": ["baseline"]}, "reference_arms"),
    ({"base": {"config": "smoke", "overrides": ["train.checkpoint_every=3"]}}, "train.checkpoint_every"),
    # the scheduler, counts and resources (Ray would assert, hang or run nothing)
    ({"scheduler": {"type": "asha", "max_t": 4, "grace_period": 0}}, "scheduler.grace_period"),
    ({"scheduler": {"type": "asha", "max_t": 4, "grace_period": 5}}, "scheduler.grace_period"),
    ({"scheduler": {"type": "asha", "max_t": 0}}, "scheduler.max_t"),
    ({"scheduler": {"type": "asha", "max_t": 2.5}}, "scheduler.max_t"),
    ({"scheduler": {"type": "asha", "reduction_factor": 1}}, "scheduler.reduction_factor"),
    ({"scheduler": {"type": "asha", "reduction_factor": "2"}}, "scheduler.reduction_factor"),
    ({"num_samples": 0}, "num_samples"),
    ({"num_samples": 1.5}, "num_samples"),
    ({"num_samples": True}, "num_samples"),
    ({"max_concurrent_trials": 0}, "max_concurrent_trials"),
    ({"max_concurrent_trials": "2"}, "max_concurrent_trials"),
    ({"resources": {"workers_per_trial": 0}}, "resources.workers_per_trial"),
    ({"resources": {"workers_per_trial": 1.5}}, "resources.workers_per_trial"),
    ({"resources": {"cpus_per_worker": 0}}, "resources.cpus_per_worker"),
    ({"resources": {"cpus_per_worker": "half"}}, "resources.cpus_per_worker"),
    ({"resources": {"gpus_per_worker": -1}}, "resources.gpus_per_worker"),
    ({"resources": [1]}, "resources"),
    ({"name": "a/b"}, "name"),
])
def test_space_validation_names_file_and_key(tmp_path, change, key):
    path = _space(tmp_path, **change)
    with pytest.raises(ConfigError) as err:
        load_space(path)
    assert str(path) in str(err.value) and key in str(err.value)


def test_owned_keys_and_int_distributions_say_what_to_do(tmp_path):
    with pytest.raises(ConfigError, match=r"the sweep sets it for every trial, from resources.workers_per_trial"):
        load_space(_space(tmp_path, space={"train.num_workers": {"grid": [1, 2]}}))
    with pytest.raises(ConfigError, match="use randint"):
        load_space(_space(tmp_path, space={"model.latent_bits": {"uniform": [4, 16]}}))
    # randint over a float key samples whole numbers, which a float field accepts
    assert load_space(_space(tmp_path, space={"model.free_bits": {"randint": [1, 2]}})).space
    # settings filled in: the runner reads them without defaults of its own
    assert load_space(_space(tmp_path, scheduler={"type": "asha"})).scheduler == {
        "type": "asha", "max_t": 100, "grace_period": 1, "reduction_factor": 2}


def test_trial_owned_keys_are_the_ones_the_trial_sets():
    """TRIAL_OWNED (what a space may not set) and own_trial_settings (what each trial sets) agree."""
    cfg = load_config(ROOT / "jobs" / "configs" / "smoke.yaml", ["train.eval_every=7"])

    def flat(d, prefix=""):
        return {k: v for key, val in d.items()
                for k, v in (flat(val, f"{prefix}{key}.") if isinstance(val, dict)
                             else {f"{prefix}{key}": val}).items()}

    before = flat(to_dict(cfg))
    own_trial_settings(cfg, Resources(workers_per_trial=3, cpus_per_worker=0.7, gpus_per_worker=1),
                       "trial-x", Path("/elsewhere/trials"))
    after = flat(to_dict(cfg))
    assert {k for k in after if after[k] != before[k]} == set(TRIAL_OWNED)
    assert cfg.train.log_every == cfg.train.checkpoint_every == 7


def test_edited_space_is_refused_on_rerun(tmp_path, monkeypatch, capsys):
    """The stored space written when the sweep started decides: the same space resumes, an edited
    one is refused (one line naming the stored file and each change), before Ray starts."""
    from ft_ray.tune import runner

    spec = load_space(_space(tmp_path, space={"model.free_bits": {"grid": [0.125, 0.5, 1.0]}}))
    spec.sweep_dir.mkdir(parents=True)
    record = write_space_record(spec, spec.sweep_dir)  # as when the sweep started
    assert check_space_record(load_space(spec.path), spec.sweep_dir) is True
    # where and how fast trials run may change between runs
    assert check_space_record(load_space(_space(tmp_path, space={"model.free_bits": {"grid": [0.125, 0.5, 1.0]}},
                                                max_concurrent_trials=1, resources={"cpus_per_worker": 0.9})),
                              spec.sweep_dir)
    edited = _space(tmp_path, space={"model.free_bits": {"grid": [0.125, 2.0, 4.0]}}, num_samples=2)
    with pytest.raises(ConfigError) as err:
        check_space_record(load_space(edited), spec.sweep_dir)
    message = str(err.value)
    assert "\n" not in message and str(record) in message and "new `name`" in message
    assert "space.model.free_bits.grid: [0.125, 0.5, 1.0] -> [0.125, 2.0, 4.0]" in message
    assert "num_samples: 1 -> 2" in message
    monkeypatch.setattr(runner, "ensure_ray", lambda: pytest.fail("Ray started for a refused sweep"))
    with pytest.raises(SystemExit) as exit_info:
        cli_main(["sweep", "--space", str(edited)])
    assert exit_info.value.code == 2
    assert capsys.readouterr().err.strip().count("\n") == 0


def test_edited_base_preset_is_refused_on_rerun(tmp_path):
    preset = tmp_path / "base.yaml"
    preset.write_text((ROOT / "jobs" / "configs" / "smoke.yaml").read_text())
    path = _space(tmp_path, base={"config": str(preset), "overrides": ["train.max_steps=20"]})
    spec = load_space(path)
    spec.sweep_dir.mkdir(parents=True)
    write_space_record(spec, spec.sweep_dir)
    preset.write_text(preset.read_text().replace("free_bits: 1.0", "free_bits: 2.0"))
    with pytest.raises(ConfigError, match="base.sha256"):
        check_space_record(load_space(path), spec.sweep_dir)


def _fake_trial(trial_id: str, status: str, free_bits=None, evaluations=0, error=None, **metrics):
    """What the runner reads of a Tune trial (ray.tune.experiment.Trial), as plain data."""
    arm = {"model.arch": "baseline"} if free_bits is None else {"model.free_bits": free_bits}
    result = {"training_iteration": evaluations, "val_nll": 2.0 + evaluations / 10, "step": evaluations * 5,
              **metrics} if evaluations else {}
    started = None if status == "PENDING" and not evaluations else 1.7e9  # Tune saves it when a trial runs
    return SimpleNamespace(trial_id=trial_id, status=status, config={"arm": arm}, last_result=result,
                           run_metadata=SimpleNamespace(start_time=started),
                           get_pickled_error=lambda: error, get_error=lambda: None)


FT_METRICS = {"val_ce_post": 1.5, "val_kl_bits": 0.5, "val_z_gap": 0.1, "ce": 9.9}


def test_results_of_an_incomplete_sweep_tell_the_truth(tmp_path):
    """Finished, stopped early, interrupted, errored, pending and never-created trials each get
    their own status; no best bundle (a stale one is removed); exit 130, or 1 for errors only."""
    from ft_ray.tune.runner import write_results

    spec = load_space(_space(tmp_path, space={"model.free_bits": {"grid": [0.125, 0.5, 1.0, 2.0, 4.0, 8.0]}},
                             reference_arms=[{"model.arch": "baseline"}]))
    sweep_dir = spec.sweep_dir
    (sweep_dir / "trials" / "trial-a" / "bundle").mkdir(parents=True)
    (sweep_dir / "best_bundle").mkdir()  # from an earlier run
    trials = [_fake_trial("a", "TERMINATED", 0.125, 4, **FT_METRICS),
              _fake_trial("b", "TERMINATED", 0.5, 2, **FT_METRICS),
              _fake_trial("c", "RUNNING", 1.0, 3, **FT_METRICS),
              _fake_trial("g", "PENDING", 8.0, 1, **FT_METRICS),  # RUNNING when saved: Tune loads it as PENDING
              _fake_trial("d", "ERROR", None, 1, error=ValueError("boom: out of memory\nsecond line"), ce=7.0),
              _fake_trial("e", "PENDING", 2.0)]  # and 4.0: never created
    assert write_results(spec, sweep_dir, trials)[0] == 130
    rows = {r["model.free_bits"] or r["model.arch"]: r for r in csv.DictReader((sweep_dir / "results.csv").open())}
    assert {k: r["status"] for k, r in rows.items()} == {
        "0.125": "ok", "0.5": "stopped early (ASHA)", "1.0": "interrupted", "8.0": "interrupted",
        "baseline": "error", "2.0": "not started", "4.0": "not started"}
    assert rows["baseline"]["error"] == "boom: out of memory"
    assert rows["2.0"]["trial"] == "trial-e" and rows["4.0"]["trial"] == ""
    # honest columns: the leaky posterior CE for FT rows only, never the training CE
    assert "val_ce" not in rows["0.125"] and rows["0.125"]["val_ce_post (leaky)"] == "1.5"
    assert rows["baseline"]["val_ce_post (leaky)"] == ""
    assert not (sweep_dir / "best_bundle").exists()
    assert "incomplete" in (sweep_dir / "results.md").read_text()

    trials = [*trials[:2], *(_fake_trial(t, "TERMINATED", fb, 4, **FT_METRICS)
                             for t, fb in (("c", 1.0), ("g", 8.0), ("e", 2.0), ("f", 4.0))), trials[4]]
    assert write_results(spec, sweep_dir, trials) == (1, "1 of 7 trials errored")
    assert not (sweep_dir / "best_bundle").exists()

    trials[-1] = _fake_trial("d", "TERMINATED", None, 4, ce=7.0)
    assert write_results(spec, sweep_dir, trials) == (0, "")
    assert (sweep_dir / "best_bundle").is_dir()  # trial-a: the only one with a bundle


def test_cli_exit_code_of_an_incomplete_sweep(tmp_path, monkeypatch, capsys):
    from ft_ray.tune import runner

    def interrupted(space):
        raise runner.SweepIncomplete(tmp_path, 130, "the sweep was interrupted: 1 of 2 trials did not finish")

    monkeypatch.setattr(runner, "run_sweep", interrupted)
    assert cli_main(["sweep", "--space", "whatever.yaml"]) == 130
    assert "interrupted" in capsys.readouterr().err


def test_metric_must_be_reported_by_every_arm(tmp_path):
    path = _space(tmp_path, metric="val_z_gap", reference_arms=[{"model.arch": "baseline"}])
    with pytest.raises(ConfigError, match="val_z_gap"):
        load_space(path)
    assert load_space(_space(tmp_path, metric="val_z_gap")).metric == "val_z_gap"  # FT-only sweep: fine


def test_a_downstream_metric_is_an_objective_when_the_base_evaluates_its_task(tmp_path):
    metric = "eval/ftray_arith_choice/acc"
    with pytest.raises(ConfigError, match="eval/ftray_arith_choice/acc"):
        load_space(_space(tmp_path, metric=metric, mode="max"))  # no train.eval_tasks: never reported
    base = yaml.safe_load((ROOT / "tune_spaces" / "smoke.yaml").read_text())["base"]
    base["overrides"] = [*base.get("overrides", []), "train.eval_tasks=[ftray_arith_choice]"]
    assert load_space(_space(tmp_path, metric=metric, mode="max", base=base)).metric == metric
    with pytest.raises(ConfigError, match="acc_nrom"):
        load_space(_space(tmp_path, metric="eval/ftray_arith_choice/acc_nrom", mode="max", base=base))


def test_shipped_spaces_are_valid():
    sizes = {p.stem: len(load_space(p).grid_arms()) for p in (ROOT / "tune_spaces").glob("*.yaml")}
    assert sizes == {"smoke": 2, "latent_free_bits": 25, "seeds": 6, "arith_downstream": 10, "letters_plan": 6,
                     "letters_plan_init_lr": 6, "letters_plan_seeds_size": 3}


@pytest.mark.timeout(420)
def test_interrupted_sweep_resumes_without_rerunning_finished_trials(ray_cluster, tmp_path):
    """A sweep stopped with Ctrl-C (SIGINT) after its first trial finished exits 130 and marks the
    other trial unfinished; run again, the finished trial keeps its bundle untouched, the other one
    completes."""
    import os
    import signal
    import subprocess
    import sys
    import time

    from ft_ray.tune.runner import run_sweep

    space = _space(tmp_path, max_concurrent_trials=1, scheduler=None)
    proc = subprocess.Popen([sys.executable, "-m", "jobs.sweep", "--space", str(space)], cwd=ROOT,
                            env={**os.environ, "RAY_ADDRESS": ""}, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True)
    sweep_dir = tmp_path / "sweeps" / "smoke"
    deadline = time.monotonic() + 240
    bundles: list[Path] = []
    while time.monotonic() < deadline and not (bundles and len(list((sweep_dir / "trials").glob("*/train.csv"))) == 2):
        bundles = list((sweep_dir / "trials").glob("*/bundle/model.safetensors"))
        time.sleep(0.5)  # until the first trial finished and the second one is training
    assert bundles, "the first trial did not finish in time"
    proc.send_signal(signal.SIGINT)  # Ctrl-C: Tune saves its state and stops
    try:
        proc.wait(timeout=120)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        raise
    first = bundles[0]
    stamp = first.stat().st_mtime_ns
    # it really stopped before the end: the second trial has no bundle
    assert list((sweep_dir / "trials").glob("*/bundle/model.safetensors")) == [first]
    # and says so: exit 130, the unfinished trial marked, no best bundle from partial results
    assert proc.returncode == 130
    rows = list(csv.DictReader((sweep_dir / "results.csv").open()))
    assert sorted(r["status"] for r in rows) in (["interrupted", "ok"], ["not started", "ok"])
    assert not (sweep_dir / "best_bundle").exists()
    assert run_sweep(space) == sweep_dir
    rows = list(csv.DictReader((sweep_dir / "results.csv").open()))
    assert len(rows) == 2 and all(r["status"] == "ok" for r in rows)
    assert (sweep_dir / "best_bundle" / "model.safetensors").is_file()
    assert first.stat().st_mtime_ns == stamp  # the finished trial was not trained again
    assert len(list((sweep_dir / "trials").glob("*/bundle/model.safetensors"))) == 2
