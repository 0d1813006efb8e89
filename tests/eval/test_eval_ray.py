"""`ft-ray eval` on a real local Ray cluster: the same numbers as the native lm-eval `ft-ray`
model, resume by name, retries, the summary, and bad input refused before any Ray work."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

os.environ["HF_HUB_OFFLINE"] = "1"  # before lm-eval imports datasets: no hub here
os.environ["HF_DATASETS_OFFLINE"] = "1"

import pytest  # noqa: E402
import torch  # noqa: E402

from ft_ray.bundle import write_bundle  # noqa: E402
from ft_ray.cli import main  # noqa: E402
from ft_ray.config import ModelConfig  # noqa: E402
from ft_ray.data.tokenizer import letter_tokenizer  # noqa: E402
from ft_ray.eval import EvalError  # noqa: E402
from ft_ray.eval.cli import run_units  # noqa: E402
from ft_ray.eval.lm import FtRayLM  # noqa: E402
from ft_ray.eval.summary import interval95  # noqa: E402
from ft_ray.eval.tasks import PAPER_TASKS, TASK_NAMES, evaluate_tasks, write_task_data  # noqa: E402
from ft_ray.eval.units import EvalPlan, Model, Settings, Unit, resolve_tasks  # noqa: E402
from ft_ray.model import build_model  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
TASKS = ("ftray_arith_choice", "ftray_arith_ppl", "ftray_letters")  # log-likelihood, rolling, generation
LIMIT, NUM_PLANS = 3, 2


@pytest.fixture(scope="module")
def bundles(tmp_path_factory):
    """{"ft": path, "base": path}: tiny random bundles with the letter tokenizer."""
    root = tmp_path_factory.mktemp("bundles")
    letter_tokenizer().save(str(root / "tokenizer.json"))
    out = {}
    for name, arch in (("ft", "free_transformer"), ("base", "baseline")):
        torch.manual_seed(0)
        cfg = ModelConfig(arch=arch, vocab_size=64, hidden_dim=32, num_layers=2, num_heads=2,
                          max_seq_len=96, latent_bits=2)
        model = build_model(cfg).eval()
        out[name] = write_bundle(root / name, model.state_dict(), model.cfg, {}, root / "tokenizer.json")
    return out


def eval_args(bundles, out: Path, seeds=(0, 1), num_plans=NUM_PLANS) -> list[str]:
    return ["eval", "--models", f"ft={bundles['ft']}", f"base={bundles['base']}", "--tasks", ",".join(TASKS),
            "--num-plans", str(num_plans), "--seeds", *map(str, seeds), "--out", str(out),
            "--limit", str(LIMIT)]


def native(bundle: Path, task: str, seed: int) -> dict:
    """The same unit through the lm-eval model directly, in this process."""
    suite = write_task_data(bundle.parent / f"suite-{task}-{seed}", seed=0)
    lm = FtRayLM(bundle=str(bundle), num_plans=NUM_PLANS, plan_seed=seed)
    return evaluate_tasks(lm, [task], suite, limit=LIMIT, bootstrap_iters=Settings(1).bootstrap_iters,
                          log_samples=False)["results"][task]


def mtimes(out: Path) -> dict[str, int]:
    return {str(p.relative_to(out)): p.stat().st_mtime_ns for p in sorted((out / "raw").rglob("*.json"))}


@pytest.mark.timeout(240)
def test_eval_on_ray_equals_native_lm_eval_and_resumes(ray_cluster, bundles, tmp_path, capsys):
    out = tmp_path / "eval"
    assert main(eval_args(bundles, out)) == 0
    printed = capsys.readouterr().out
    assert printed.count("[ft-ray] eval ") == 9 and "9 units, 0 already" in printed  # ft 3x2, base 3x1
    assert f"{out / 'results.md'}" in printed
    files = mtimes(out)
    assert sorted(files) == sorted([f"raw/ft/{t}/seed{s}.json" for t in TASKS for s in (0, 1)]
                                   + [f"raw/base/{t}/seed0.json" for t in TASKS])
    summary = json.loads((out / "results.json").read_text())
    for model, task, seed in (("ft", "ftray_arith_ppl", 1), ("ft", "ftray_letters", 0),
                              ("base", "ftray_arith_choice", 0)):
        raw = json.loads((out / f"raw/{model}/{task}/seed{seed}.json").read_text())["results"][task]
        ref = native(bundles[model], task, seed)
        metrics = [k for k in ref if k.endswith(",none") and "_stderr" not in k]
        assert metrics and {k: raw[k] for k in metrics} == {k: ref[k] for k in metrics}
        for k in metrics:
            assert summary["results"][task][k.split(",")[0]][model]["seeds"][str(seed)] == ref[k]
    bpb = summary["results"]["ftray_arith_ppl"]["bits_per_byte"]["ft"]["seeds"]
    assert bpb["0"] != bpb["1"]  # the plan seed matters: the check above is not vacuous
    acc = summary["results"]["ftray_arith_choice"]["acc"]
    assert acc["ft"]["num_seeds"] == 2 and acc["ft"]["mean"] == pytest.approx(
        sum(acc["ft"]["seeds"].values()) / 2)
    assert acc["base"]["num_seeds"] == 1 and acc["base"]["ci95"] is None  # exact: no plans
    assert summary["chance"]["ftray_arith_choice"] == {"acc": 0.25, "acc_norm": 0.25}
    table = (out / "results.md").read_text()
    assert "| ftray_arith_choice | acc ↑ | 0.25 |" in table and "(n=2)" in table and "(n=1)" in table
    assert (out / "results.png").stat().st_size > 0

    # resume: nothing reruns; one more seed runs only the FT's two new units
    assert main(eval_args(bundles, out)) == 0
    assert "9 already" in capsys.readouterr().out and mtimes(out) == files
    assert main(eval_args(bundles, out, seeds=(0, 1, 2))) == 0
    printed = capsys.readouterr().out
    assert "12 units, 9 already" in printed and printed.count("[ft-ray] eval ") == 3
    after = mtimes(out)
    assert {k: after[k] for k in files} == files and len(after) == 12
    assert json.loads((out / "results.json").read_text())["results"]["ftray_letters"]["valid"]["ft"]["num_seeds"] == 3

    # another evaluation in the same directory: refused in one line, nothing written
    assert main(eval_args(bundles, out, num_plans=3)) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "num_plans 2 there, 3 now" in err and mtimes(out) == after


def flaky_work(settings: Settings, unit: Unit, files: dict) -> dict:
    """Fails on its first attempt at every unit, and always at seed 13."""
    marker = Path(os.environ["FT_RAY_TEST_MARKERS"]) / f"{unit.model}-{unit.task}-{unit.seed}"
    if unit.seed == 13 or not marker.exists():
        marker.touch()
        raise RuntimeError(f"injected failure at {unit}")
    return {"results": {unit.task: {"acc,none": float(unit.seed)}}}


@pytest.mark.timeout(120)
def test_failed_units_are_retried_and_finished_ones_kept(ray_cluster, bundles, tmp_path, monkeypatch, capsys):
    from ray import cloudpickle

    monkeypatch.setattr("ft_ray.eval.cli.worker_env", lambda s: {"FT_RAY_TEST_MARKERS": str(tmp_path)})
    model = Model("m", bundles["base"], "free_transformer", "x")
    plan = EvalPlan(Settings(1), [model], ["t"], [0, 1, 13])
    out = tmp_path / "out"
    module = sys.modules[flaky_work.__module__]  # not importable by the workers: ship it by value
    cloudpickle.register_pickle_by_value(module)
    try:
        failed = run_units(out, plan, plan.units(), work=flaky_work, max_retries=1)
    finally:
        cloudpickle.unregister_pickle_by_value(module)
    assert [(u.seed, "injected failure at m t seed 13" in why) for u, why in failed] == [(13, True)]
    assert sorted(p.name for p in (out / "raw/m/t").iterdir()) == ["seed0.json", "seed1.json"]
    assert "FAILED m t seed 13" in capsys.readouterr().out


def test_interval_over_seeds():
    assert interval95([0.5]) is None
    lo, hi = interval95([1.0, 2.0, 3.0])  # mean 2, s = 1, t(2) = 4.303
    assert (lo + hi) / 2 == pytest.approx(2.0) and hi - lo == pytest.approx(2 * 4.303 / math.sqrt(3))


# ------------------------------------------------------------------------------- bad input
def test_bad_input_is_one_line_and_exit_2_before_ray(bundles, tmp_path, monkeypatch, capsys):
    def no_ray(*args, **kwargs):
        raise AssertionError("Ray was started for bad input")

    monkeypatch.setattr("ft_ray.eval.cli.ensure_ray", no_ray)
    broken = tmp_path / "broken"
    broken.mkdir()
    for f in ("model.safetensors", "config.json", "metrics.json", "tokenizer.json"):
        (broken / f).write_text("not what it should be")
    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "notes.txt").write_text("mine")
    good = ["--models", str(bundles["ft"]), "--out", str(tmp_path / "out")]
    cases = [
        (["--tasks", "ftray_arith_gen,ftray_nope"], ["ftray_nope", "known offline: ftray_arith_gen"]),
        (["--tasks", "paper"], ["humaneval_plus", "gsm8k", "HF_DATASETS_OFFLINE=0"]),
        (["--models", str(tmp_path / "missing")], [str(tmp_path / "missing"), "missing model.safetensors"]),
        (["--models", str(broken)], [f"cannot load bundle {broken}"]),
        (["--num-plans", "0"], ["--num-plans must be an integer >= 1, got 0"]),
        (["--seeds"], ["--seeds is empty"]),
        (["--out", str(busy)], [f"{busy} exists and is not an ft-ray evaluation"]),
    ]
    for extra, needles in cases:
        assert main(["eval", *good, *extra]) == 2, extra
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and err.startswith("ft-ray: error: "), err
        assert all(n in err for n in needles), (extra, err)
    assert not (tmp_path / "out").exists()


def test_hub_task_names_are_checked_against_lm_evals_list_when_the_hub_is_on(bundles, tmp_path, monkeypatch,
                                                                            capsys):
    for var in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE"):
        monkeypatch.setenv(var, "0")
    registered = type("Manager", (), {"all_tasks": [*PAPER_TASKS, "mmlu_stem"]})()
    monkeypatch.setattr("ft_ray.eval.tasks.task_manager", lambda path, include_defaults=False: registered)
    assert resolve_tasks(["ftray_letters,gsm8k", "mmlu_stem", "ftray"]) == [
        "ftray_letters", "gsm8k", "mmlu_stem", *(t for t in TASK_NAMES if t != "ftray_letters")]
    assert resolve_tasks(["paper"]) == list(PAPER_TASKS)
    with pytest.raises(EvalError, match="unknown task\\(s\\) 'gsm8kk': neither offline"):
        resolve_tasks(["gsm8k,gsm8kk"])
    assert main(["eval", "--models", str(bundles["ft"]), "--tasks", "paper", "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "humaneval_plus, mbpp execute generated code" in err


def test_jobs_entry_point_refuses_bad_input_in_one_line(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "jobs.eval", "--models", str(tmp_path / "nope"),
                           "--out", str(tmp_path / "out")], cwd=ROOT, capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 2 and proc.stderr.strip().splitlines() == [
        f"ft-ray: error: cannot load bundle {tmp_path / 'nope'}: {tmp_path / 'nope'}: not a complete "
        "bundle, missing model.safetensors, config.json, metrics.json"]
