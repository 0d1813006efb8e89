"""The main demo: a Free Transformer and a baseline learn the paper's letter task on Ray.

    python -m jobs.demo [--steps 800] [--kappa 1.0] [--out results/demo]

1. writes the letter-task shards (data/letters; reused when present),
2. trains a baseline and a Free Transformer on them with 2 Ray Train workers (FSDP2),
   reusing finished runs,
3. evaluates both honestly and writes results/demo/report.md (table, curves, the Fig. 4 picture),
4. prints samples with fresh and shared plans and the plan codes that made them.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

from ft_ray.launch import ensure_ray, one_line_errors, resolve_preset

ROOT = Path(__file__).resolve().parent.parent


def prepare_letters(out: Path, num_sequences: int) -> None:
    from ft_ray.data.shards import validate_shards, write_synthetic_shards

    if (out / "manifest.json").exists():
        validate_shards(out)
        print(f"[demo] reusing the letter-task shards in {out}", flush=True)
        return
    write_synthetic_shards("letters", num_sequences, seed=0, out_dir=out, val_fraction=0.02)


def show_samples(bundle: Path, letter: str = "K", n: int = 6) -> None:
    from ft_ray.data.letters import PROMPT_TOKENS, check_body, decode, prompt_ids
    from ft_ray.train.checkpoint import load_bundle

    model, cfg, _ = load_bundle(bundle)
    prompt = torch.tensor([prompt_ids(letter)] * n)
    for shared in (False, True):
        kwargs = dict(plan=11, shared_plan=True) if shared else {}
        tokens, z = model.generate(prompt, 65, generator=torch.Generator().manual_seed(3),
                                   return_plan=True, **kwargs)
        print(f"\n{'one shared plan' if shared else 'fresh plans'}, prompt '{letter}>' "
              f"(first 4 plan codes of the body, H={cfg.latent_bits} bits):")
        for row, codes in zip(tokens.tolist(), z[:, PROMPT_TOKENS:PROMPT_TOKENS + 4].tolist()):
            body = decode(row[PROMPT_TOKENS:])[:64]
            print(f"  {body}  {'ok ' if check_body(body, letter).valid else 'bad'}  z={codes}")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=800)
    ap.add_argument("--kappa", type=float, default=1.0, help="free bits per token of the FT")
    ap.add_argument("--data", default=str(ROOT / "data" / "letters"))
    ap.add_argument("--runs", default=str(ROOT / "runs" / "demo"))
    ap.add_argument("--out", default=str(ROOT / "results" / "demo"))
    args = ap.parse_args(argv)
    t0 = time.time()
    with one_line_errors():
        from ft_ray.compare import run_compare

        print("[demo] 1/4 letter-task shards", flush=True)
        prepare_letters(Path(args.data), num_sequences=100_000)
        owns_ray = ensure_ray()
        print("[demo] 2/4 training the baseline and the Free Transformer (2 Ray Train workers each)", flush=True)
        overrides = ["data.source=shards", f"data.path={args.data}", f"train.max_steps={args.steps}",
                     f"train.storage_path={args.runs}", "train.name=letters"]
        report = run_compare(resolve_preset("letters-ft"), overrides, [args.kappa], Path(args.out))
        print("[demo] 3/4 samples from the Free Transformer's bundle", flush=True)
        show_samples(Path(args.runs) / f"letters-kappa{args.kappa:g}" / "bundle")
    if owns_ray:
        import ray

        ray.shutdown()
    print(f"\n[demo] 4/4 done in {time.time() - t0:.0f} s. Report: {report}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
