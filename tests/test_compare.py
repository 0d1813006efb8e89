"""Unit tests of `ft-ray compare` that train nothing: the arms derived from one config, the choice of
downstream tasks, a bad task refused before any run, and a report assembled from finished runs
(bundles written here) whose figures equal the evaluation functions called directly. The demo and
tests/test_jobs.py run it end to end on Ray."""

from __future__ import annotations

import csv
import json

import pytest
import torch
import yaml

from ft_ray.bundle import load_bundle, write_bundle
from ft_ray.compare import (
    arms,
    downstream_rows,
    downstream_tasks,
    run_compare,
    validation_rows,
)
from ft_ray.config import ConfigError, load_config
from ft_ray.data.tokenizer import letter_tokenizer
from ft_ray.eval.validation import letter_plan_eval
from ft_ray.model import build_model
from ft_ray.presets import resolve_preset
from ft_ray.report import evaluate_bundle
from ft_ray.train.trainer import run_dir_of

pytestmark = pytest.mark.timeout(240)

TINY = {"model.hidden_dim": 32, "model.num_layers": 2, "model.num_heads": 2, "model.latent_bits": 2,
        "data.num_val_sequences": 64, "train.max_steps": 4}


def _config(tmp_path, task: str = "letters") -> tuple:
    """A smoke-sized letters (or arith) config file under tmp_path, runs stored there."""
    raw = yaml.safe_load(resolve_preset("smoke").read_text())
    raw["data"]["task"] = task
    raw["train"]["storage_path"] = str(tmp_path / "runs")
    for key, value in TINY.items():
        section, name = key.split(".")
        raw[section][name] = value
    path = tmp_path / "cfg.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path, ["train.name=cmp"]


def test_arms_share_everything_but_arch_kappa_and_run_name(tmp_path):
    path, overrides = _config(tmp_path)
    configs = arms(path, overrides, [0.5, 2.0])
    assert list(configs) == ["baseline", "FT kappa=0.5", "FT kappa=2"]
    assert [c.train.name for c in configs.values()] == ["cmp-baseline", "cmp-kappa0.5", "cmp-kappa2"]
    assert [c.model.arch for c in configs.values()] == ["baseline", "free_transformer", "free_transformer"]
    assert [c.model.free_bits for c in list(configs.values())[1:]] == [0.5, 2.0]
    assert not configs["baseline"].model.has_latent and configs["FT kappa=2"].model.has_latent
    base = load_config(path, overrides)
    for cfg in configs.values():  # data, optimiser, sizes, seeds: the loaded config's
        assert cfg.data == base.data and cfg.optim == base.optim
        assert cfg.model.hidden_dim == 32 and cfg.train.max_steps == 4 and cfg.train.seed == base.train.seed


def test_downstream_tasks_follow_the_data_unless_named(tmp_path):
    letters, _ = _config(tmp_path)
    assert downstream_tasks(load_config(letters)) == ["ftray_letters"]
    arith, _ = _config(tmp_path, task="arith")
    assert downstream_tasks(load_config(arith)) == ["ftray_arith_choice", "ftray_arith_gen"]
    assert downstream_tasks(load_config(arith), ["ftray_arith_ppl"]) == ["ftray_arith_ppl"]
    assert downstream_tasks(load_config(arith), []) == []
    named = load_config(arith, ["train.eval_tasks=[ftray_arith_gen]"])
    assert downstream_tasks(named) == ["ftray_arith_gen"]


def test_an_unknown_task_is_refused_before_anything_trains(tmp_path):
    path, overrides = _config(tmp_path)
    with pytest.raises(ConfigError, match=r"--eval-tasks.*no_such_task.*ftray_letters"):
        run_compare(path, overrides, [1.0], tmp_path / "out", eval_tasks=["no_such_task"])
    assert not (tmp_path / "out").exists()
    assert not list((tmp_path / "runs").glob("*/bundle"))


def _finished_run(cfg, seed: int, tokens_per_s: list[float]) -> None:
    """What a finished training run leaves for compare: its bundle at max_steps and train.csv."""
    run_dir = run_dir_of(cfg)
    run_dir.mkdir(parents=True, exist_ok=True)
    tok = run_dir / "tokenizer.json"
    tok.write_text(letter_tokenizer().to_str())
    torch.manual_seed(seed)
    model = build_model(cfg.model)
    write_bundle(run_dir / "bundle", model.state_dict(), cfg.model, {"step": cfg.train.max_steps}, tok)
    with (run_dir / "train.csv").open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=["step", "ce", "kl_bits", "tokens_per_s"])
        w.writeheader()
        for i, t in enumerate(tokens_per_s):
            w.writerow({"step": i + 1, "ce": 3.0, "kl_bits": 1.0 if cfg.model.has_latent else "", "tokens_per_s": t})


def test_the_report_of_finished_runs_equals_the_evaluation_functions(tmp_path):
    path, overrides = _config(tmp_path)
    configs = arms(path, overrides, [1.0])
    for seed, cfg in enumerate(configs.values()):
        _finished_run(cfg, seed, tokens_per_s=[10.0, 400.0, 100.0, 300.0])  # median of all but the first: 300
    out = tmp_path / "out"
    report = run_compare(path, overrides, [1.0], out, eval_tasks=[])  # reuses both runs: no Ray, no training

    rows = {r["arm"]: r for r in json.loads((out / "results.json").read_text())}
    assert list(rows) == ["baseline", "FT kappa=1"]
    for label, cfg in configs.items():
        model, _, _ = load_bundle(run_dir_of(cfg) / "bundle")
        expected = evaluate_bundle(model, validation_rows(cfg), iwae_samples=8 if cfg.model.has_latent else 0)
        for key, value in expected.items():
            assert rows[label][key] == pytest.approx(value, rel=1e-6), (label, key)
        assert rows[label]["tokens_per_s"] == 300.0
    assert rows["baseline"]["kappa"] is None and rows["FT kappa=1"]["kappa"] == 1.0
    assert "kl_bits" not in rows["baseline"] and rows["FT kappa=1"]["ce_random_z"] > 0
    ft_model, _, _ = load_bundle(run_dir_of(configs["FT kappa=1"]) / "bundle")
    plan = letter_plan_eval(ft_model, num_groups=24, seed=1)  # the plan test, with compare's settings
    for key in ("valid_fresh", "pos_agree_shared", "start_spread_fresh"):
        assert rows["FT kappa=1"][key] == pytest.approx(plan[key], nan_ok=True), key
    assert "pos_agree_shared" not in rows["baseline"]
    text = report.read_text()
    assert "| model | kappa (bits) | NLL bound (nats/tok) |" in text and "| FT kappa=1 | 1 |" in text
    assert f"| baseline |  | {rows['baseline']['nll']:.4f} |" in text
    assert "Letter task (24 groups" in text and "## Downstream" not in text
    assert (out / "curves.png").stat().st_size > 1000 and (out / "samples.png").is_file()
    assert json.loads((out / "downstream.json").read_text()) == []


def test_downstream_rows_pool_plan_seeds_for_an_ft_and_score_a_baseline_once(tmp_path):
    from ft_ray.eval.summary import interval95
    from ft_ray.eval.units import downstream_metrics

    path, overrides = _config(tmp_path, task="arith")
    configs = arms(path, overrides, [1.0])
    tok = letter_tokenizer()
    models = {}
    for seed, (label, cfg) in enumerate(configs.items()):
        torch.manual_seed(seed)
        models[label] = (build_model(cfg.model).eval(), tok)
    rows = downstream_rows(models, ["ftray_arith_choice"], seeds=[0, 1], limit=6, num_plans=2)
    by = {(r["model"], r["metric"]): r for r in rows}
    assert set(by) == {(m, k) for m in models for k in ("acc", "acc_norm")}
    assert by["baseline", "acc"]["n"] == 1 and by["FT kappa=1", "acc"]["n"] == 2
    assert by["baseline", "acc"]["chance"] == 0.25 and by["baseline", "acc"]["ci95"] is None
    ft, _ = models["FT kappa=1"]
    per_seed = [downstream_metrics(ft, tok, ["ftray_arith_choice"], 6, 2, seed=s)["eval/ftray_arith_choice/acc"]
                for s in (0, 1)]
    assert by["FT kappa=1", "acc"]["mean"] == pytest.approx(sum(per_seed) / 2)
    assert by["FT kappa=1", "acc"]["ci95"] == interval95(per_seed)
