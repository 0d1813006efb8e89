"""Unit tests of the reporting helpers: the letter task's plan statistics and the comparison's
table and curves (the demo covers them end to end; these pin the numbers)."""

from __future__ import annotations

import csv

import numpy as np
import pytest

from ft_ray.eval.validation import chance_modal_share, modal_share
from ft_ray.report import markdown_table, plot_curves, read_csv


def test_modal_share_and_its_chance_level_match_closed_forms():
    assert modal_share([3, 3, 5, 3]) == 0.75
    assert modal_share([7]) is None
    pool = list(range(10))  # starts uniform over 10 positions
    # two samples: the same position with probability 1/10 (share 1), else 1/2 -> 0.55
    assert chance_modal_share(pool, [2], draws=4000) == pytest.approx(0.55, abs=0.02)
    assert chance_modal_share([4] * 5, [8, 3]) == 1.0  # one position: always agree
    # 8 samples over 10 positions: E[max bin count] / 8, by simulation with another generator
    rng = np.random.default_rng(123)
    expected = np.mean([np.bincount(rng.integers(0, 10, 8)).max() / 8 for _ in range(20000)])
    assert chance_modal_share(pool, [8], draws=4000) == pytest.approx(expected, abs=0.015)
    assert np.isnan(chance_modal_share([], [8]))


def test_markdown_table_formats_and_leaves_missing_values_empty():
    rows = [{"arm": "baseline", "nll": 1.23456, "k": None}, {"arm": "FT", "nll": float("nan"), "k": 2.0}]
    table = markdown_table(rows, [("arm", "model", "s"), ("nll", "NLL", ".3f"), ("k", "kappa", "g")])
    assert table.splitlines() == ["| model | NLL | kappa |", "|---|---|---|",
                                  "| baseline | 1.235 |  |", "| FT |  | 2 |"]


def _write_csv(path, rows):
    with path.open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)


def test_curves_put_each_kind_of_training_ce_on_labelled_panels(tmp_path, monkeypatch):
    base, ft = tmp_path / "base", tmp_path / "ft"
    for d in (base, ft):
        d.mkdir()
    _write_csv(base / "train.csv", [{"step": s, "ce": 3 - s / 10, "kl_bits": "", "loss": 3 - s / 10} for s in (1, 2)])
    _write_csv(ft / "train.csv", [{"step": s, "ce": 2 - s / 10, "kl_bits": 1.5, "loss": 2.1} for s in (1, 2)])
    for d in (base, ft):
        _write_csv(d / "eval.csv", [{"step": 2, "nll": 2.5}])
    assert np.isnan(read_csv(base / "train.csv")[0]["kl_bits"])

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    captured, save = {}, plt.Figure.savefig

    def keep(fig, *args, **kwargs):
        captured["fig"] = fig
        return save(fig, *args, **kwargs)

    monkeypatch.setattr(plt.Figure, "savefig", keep)
    out = plot_curves({"baseline": base, "FT": ft}, tmp_path / "curves.png")
    assert out.is_file() and out.stat().st_size > 1000
    ce, kl, nll = captured["fig"].axes
    assert [line.get_label() for line in ce.lines] == ["baseline (CE = NLL)", "FT (CE with encoder Z, leaky)"]
    assert [line.get_label() for line in kl.lines] == ["FT"]  # the baseline has no latent
    assert list(kl.lines[0].get_ydata()) == [1.5, 1.5]
    assert [line.get_label() for line in nll.lines] == ["baseline", "FT"]


def test_letter_plan_eval_reports_chance_interval_and_spread_for_an_ft_only():
    import torch

    from ft_ray.config import ModelConfig
    from ft_ray.data.letters import VOCAB
    from ft_ray.eval.validation import letter_plan_eval
    from ft_ray.model import build_model

    torch.manual_seed(0)
    shape = dict(vocab_size=len(VOCAB), hidden_dim=32, num_layers=2, num_heads=2, max_seq_len=96, latent_bits=2)
    ft = letter_plan_eval(build_model(ModelConfig(**shape)).eval(), num_groups=2, group_size=4)
    per_kind = {"valid", "pos_agree", "pos_agree_{}_ci95", "start_spread"}
    names = {k.format(t) if "{}" in k else f"{k}_{t}" for k in per_kind for t in ("fresh", "shared")}
    assert set(ft) == names | {"pos_agree_chance"}
    assert all(0 <= ft[f"valid_{t}"] <= 1 for t in ("fresh", "shared"))
    base = letter_plan_eval(build_model(ModelConfig(arch="baseline", **shape)).eval(), num_groups=2, group_size=4)
    assert set(base) == {k.format("fresh") if "{}" in k else f"{k}_fresh" for k in per_kind}
