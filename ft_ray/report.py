"""Report pieces: honest evaluation of bundles, the markdown table, plots, and the letter task's
sample picture (the paper's Fig. 4: rows of samples with fresh plans vs one shared plan)."""

from __future__ import annotations

import csv
import math
from pathlib import Path

import numpy as np
import torch

from ft_ray.data.letters import PROMPT_TOKENS, check_body, decode, prompt_ids
from ft_ray.eval.validation import batch_metrics


@torch.no_grad()
def evaluate_bundle(model, val: torch.Tensor, batch_size: int = 64, iwae_samples: int = 8,
                    seed: int = 0) -> dict[str, float]:
    """Honest metrics of one model on fixed validation rows (nats/token)."""
    torch.manual_seed(seed)
    parts = [batch_metrics(model, val[i:i + batch_size], iwae_samples)
             for i in range(0, len(val) - batch_size + 1, batch_size)]
    out = {k: float(np.mean([p[k] for p in parts])) for k in parts[0]}
    out["params"] = float(model.num_params())
    return out


def read_csv(path: Path) -> list[dict[str, float]]:
    if not path.exists():
        return []
    return [{k: float(v) if v not in ("", None) else math.nan for k, v in row.items()}
            for row in csv.DictReader(path.open())]


def markdown_table(rows: list[dict], columns: list[tuple[str, str, str]]) -> str:
    """columns: (key, header, format)."""
    head = "| " + " | ".join(h for _, h, _ in columns) + " |"
    sep = "|" + "|".join("---" for _ in columns) + "|"
    body = []
    for r in rows:
        cells = []
        for key, _, fmt in columns:
            v = r.get(key)
            cells.append("" if v is None or (isinstance(v, float) and math.isnan(v)) else format(v, fmt))
        body.append("| " + " | ".join(cells) + " |")
    return "\n".join([head, sep, *body])


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_figure(fig, axes, out: Path) -> Path:
    """Legend and grid on every axis, tight layout, PNG, close."""
    plt = _plt()
    for ax in np.atleast_1d(axes):
        if ax.get_legend_handles_labels()[0]:  # a panel no run has data for stays without a legend
            ax.legend(fontsize=8)
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


def plot_curves(runs: dict[str, Path], out: Path) -> Path:
    """Per run: the training CE, the FT's KL against its free bits, and the validation NLL bound.

    The training objectives of the two kinds of model are not one quantity (the baseline's CE is
    its NLL; an FT's CE uses the encoder's Z, which saw the tokens, and its objective adds the
    free-bits KL term), so they get separate, labelled panels; only the validation bounds share
    an axis, and they are bounds (exact NLL for the baseline, the ELBO for an FT).
    """
    plt = _plt()
    fig, axes = plt.subplots(1, 3, figsize=(15, 4))
    for label, run_dir in runs.items():
        train = read_csv(run_dir / "train.csv")
        steps = [r["step"] for r in train]
        if train:
            ft = not math.isnan(train[0].get("kl_bits", math.nan))  # the baseline's column is empty
            what = "CE with encoder Z, leaky" if ft else "CE = NLL"
            axes[0].plot(steps, [r["ce"] for r in train], label=f"{label} ({what})", linestyle="--" if ft else "-")
            if ft:
                axes[1].plot(steps, [r["kl_bits"] for r in train], label=label)
        ev = read_csv(run_dir / "eval.csv")
        if ev:
            axes[2].plot([r["step"] for r in ev], [r["nll"] for r in ev], marker="o", label=label)
    axes[0].set(title="training CE (not comparable across kinds)", xlabel="step", ylabel="nats/token")
    axes[1].set(title="FT: KL of the encoder's Z to the uniform prior", xlabel="step", ylabel="bits/token")
    axes[2].set(title="validation NLL bound (exact for baseline, ELBO for FT)", xlabel="step", ylabel="nats/token")
    return save_figure(fig, axes, out)


def plot_kl_vs_kappa(points: list[tuple[float, float, float]], out: Path) -> Path:
    """points: (kappa bits, KL bits/token, Z-usage gap nats)."""
    plt = _plt()
    points = sorted(points)
    fig, ax = plt.subplots(figsize=(5.5, 4))
    ks = [p[0] for p in points]
    ax.plot(ks, [p[1] for p in points], marker="o", label="KL (bits/token)")
    ax.plot(ks, ks, linestyle=":", color="gray", label="KL = kappa")
    ax.plot(ks, [p[2] / math.log(2) for p in points], marker="s", label="Z-usage gap (bits/token)")
    ax.set(xscale="log", xlabel="free bits kappa (bits/token)", title="What the latent carries vs kappa")
    return save_figure(fig, ax, out)


@torch.no_grad()
def letter_samples(model, letter: str, n: int, shared: bool, seed: int) -> list[str]:
    prompt = torch.tensor([prompt_ids(letter)] * n)
    kwargs = dict(plan=seed, shared_plan=True) if shared else {}
    tokens = model.generate(prompt, 65, generator=torch.Generator().manual_seed(seed), **kwargs)
    return [decode(row[PROMPT_TOKENS:])[:64].ljust(64) for row in tokens.tolist()]


def plot_letter_samples(models: dict[str, object], out: Path, letter: str = "K", n: int = 8, seed: int = 0) -> Path:
    """Fig. 4 style: per model, n samples with fresh plans, then n sharing one plan. Letters in
    blue, '!' in red; a valid sample is marked on the right."""
    plt = _plt()
    from matplotlib.colors import ListedColormap

    blocks, labels = [], []
    for name, model in models.items():
        for shared in (False, True):
            bodies = letter_samples(model, letter, n, shared, seed)
            grid = np.array([[2 if c == letter else 1 if c == "!" else 0 for c in b] for b in bodies])
            valid = [check_body(b.rstrip(), letter).valid for b in bodies]
            blocks.append((grid, valid))
            labels.append(f"{name}\n{'one shared plan' if shared else 'fresh plans'}")
    fig, axes = plt.subplots(len(blocks), 1, figsize=(9, 1.0 + 0.32 * n * len(blocks)), squeeze=False)
    cmap = ListedColormap(["#f2f2f2", "#d62728", "#1f4e9c"])
    for ax, (grid, valid), label in zip(axes[:, 0], blocks, labels):
        ax.imshow(grid, cmap=cmap, vmin=0, vmax=2, aspect="auto", interpolation="nearest")
        ax.set_yticks(range(n), ["ok" if v else "bad" for v in valid], fontsize=6)
        ax.set_xticks([])
        ax.set_ylabel(label, rotation=0, ha="right", va="center", fontsize=8)
    fig.suptitle(f"Samples from prompt '{letter}>': the run of {letter} (blue), '!' noise (red)", fontsize=10)
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out
