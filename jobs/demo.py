"""The main demo: a Free Transformer and a baseline learn the paper's letter task on Ray.

    python -m jobs.demo [--steps 600] [--kappa 1.0] [--out results/demo]
    ray job submit --working-dir . -- python -m jobs.demo --data /shared/data/letters \
        --runs /shared/runs/demo --out /shared/results/demo    # paths every node reaches

1. writes the letter-task shards (data/letters; reused when present),
2. trains a baseline and a Free Transformer on them with 2 Ray Train workers (FSDP2),
   reusing finished runs,
3. evaluates both honestly and writes results/demo/report.md (table, curves, the Fig. 4 picture),
4. deploys the Ray Serve app with both bundles and calls it over HTTP with fresh and shared
   plans; the served samples, how often they agree on the run's position, and a replay of one
   sample from its returned seed and codes are added to the report.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path

import numpy as np

from ft_ray.cluster import ensure_ray
from ft_ray.entrypoint import one_line_errors
from ft_ray.presets import resolve_preset

ROOT = Path(__file__).resolve().parent.parent
SERVED_LETTERS = "KQX"  # one group of samples per letter and plan mode
GROUP_SIZE = 8
APP = "ft-ray-demo"  # the demo's Serve application (and route prefix), apart from a user's `ft-ray`


def prepare_letters(out: Path, num_sequences: int) -> None:
    from ft_ray.data.shards import validate_shards, write_synthetic_shards

    if (out / "manifest.json").exists():
        validate_shards(out)
        print(f"[demo] reusing the letter-task shards in {out}", flush=True)
        return
    write_synthetic_shards("letters", num_sequences, seed=0, out_dir=out, val_fraction=0.01)


def copy_bundles(bundles: dict[str, Path], models_dir: Path) -> Path:
    """The Serve app's model directory: one copy of each bundle under its served name (copies,
    not links: the app refuses names that resolve outside its directory)."""
    models_dir.mkdir(parents=True, exist_ok=True)
    for name, bundle in bundles.items():
        shutil.copytree(bundle, models_dir / name, dirs_exist_ok=True)
    return models_dir


def served_group(url: str, model: str, letter: str, plan: dict | None, seed: int) -> list[dict]:
    from ft_ray.serve.client import post_json

    body = {"model": model, "prompt": f"{letter}>", "max_tokens": 65, "n": GROUP_SIZE, "seed": seed}
    if plan is not None:
        body["plan"] = plan
    return post_json(f"{url}/v1/completions", body)["choices"]


def serve_step(bundles: dict[str, Path], out: Path, port: int) -> list[str]:
    """Deploy both bundles as the app `ft-ray-demo`, sample them over HTTP, remove the app (and
    Serve, when this step started it); return the report's lines."""
    from ray import serve

    from ft_ray.cluster import free_port
    from ft_ray.serve.cli import deploy

    models = copy_bundles(bundles, out / "models").resolve()
    url, started = deploy(models, port=port or free_port(), name=APP, route_prefix=f"/{APP}")
    try:
        return sample_served(url, out)
    finally:
        if started:
            serve.shutdown()
        else:  # a Serve instance of the cluster's: leave it and its other apps alone
            serve.delete(APP)


def sample_served(url: str, out: Path) -> list[str]:
    from ft_ray.eval.validation import score_group
    from ft_ray.serve.client import get_json, post_json

    served = [m["id"] for m in get_json(f"{url}/v1/models")["data"]]
    print(f"[demo] serving {', '.join(served)} at {url}", flush=True)
    lines = ["", "## Served over HTTP (Ray Serve)", "",
             f"`POST {url}/v1/completions` on the demo's own Serve app; {GROUP_SIZE} samples per request "
             f"(`n`), prompts {', '.join(f'`{c}>`' for c in SERVED_LETTERS)}. *same start* is the share of "
             "a group's valid samples that put the run at the group's most common position.", "",
             "| model | plan | valid | same start | first sample (prompt K>) |", "|---|---|---|---|---|"]
    replay = None
    for name in served:
        modes = {"fresh plans": lambda g: {"seed": 100 + g},
                 "one shared plan": lambda g: {"seed": 100 + g, "shared": True}}
        if name == "baseline":
            modes = {"(no latent)": lambda g: None}
        for mode, plan_of in modes.items():
            valid, agree, first = [], [], None
            for g, letter in enumerate(SERVED_LETTERS):
                choices = served_group(url, name, letter, plan_of(g), seed=g + 1)
                v, a = score_group([c["text"][:64] for c in choices], letter)
                valid.append(v)
                agree += [a] if a is not None else []
                first = first or choices[0]
                print(f"[demo] {name}, {mode}, '{letter}>':", flush=True)
                for c in choices[:4]:
                    codes = c.get("plan", {}).get("codes", [])[:4]
                    print(f"    {c['text'][:64]}  {'z=' + str(codes) if codes else ''}", flush=True)
            share = f"{np.mean(agree):.2f}" if agree else ""
            lines.append(f"| {name} | {mode} | {np.mean(valid):.2f} | {share} | `{first['text'][:64]}` |")
            if mode == "one shared plan":
                replay = (name, first)
    if replay is not None:  # the returned seed and codes reproduce a sample exactly
        name, c = replay
        again = post_json(f"{url}/v1/completions", {
            "model": name, "prompt": f"{SERVED_LETTERS[0]}>", "max_tokens": 65, "seed": c["seed"],
            "plan": {"codes": c["plan"]["prompt_codes"] + c["plan"]["codes"]}})["choices"][0]["text"]
        lines += ["", f"Replaying the first shared-plan sample from its returned `seed` and plan codes gives "
                      f"{'the same text' if again == c['text'] else 'a DIFFERENT text'}."]
        same = "same" if again == c["text"] else "DIFFERENT"
        print(f"[demo] replay of a served sample from its seed and codes: {same}")
    (out / "served.json").write_text(json.dumps({"url": url, "models": served}, indent=2))
    return lines


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=600, help="training steps per model (default: 600, "
                    "where Z already carries the run's position)")
    ap.add_argument("--kappa", type=float, default=1.0, help="free bits per token of the FT")
    ap.add_argument("--data", default=str(ROOT / "data" / "letters"))
    ap.add_argument("--runs", default=str(ROOT / "runs" / "demo"))
    ap.add_argument("--out", default=str(ROOT / "results" / "demo"))
    ap.add_argument("--num-sequences", type=int, default=100_000,
                    help="letter-task training sequences to write (validation: 1%% more; default: 100000)")
    ap.add_argument("--port", type=int, default=0, help="HTTP port of the Serve step (default: a free one)")
    ap.add_argument("--no-serve", action="store_true", help="skip the Serve step (train and report only)")
    args = ap.parse_args(argv)
    t0 = time.time()
    out, runs = Path(args.out), Path(args.runs)
    with one_line_errors():
        from ft_ray.compare import run_compare

        print("[demo] 1/4 letter-task shards", flush=True)
        prepare_letters(Path(args.data), num_sequences=args.num_sequences)
        owns_ray = ensure_ray()
        print("[demo] 2/4 training the baseline and the Free Transformer (2 Ray Train workers each)", flush=True)
        overrides = ["data.source=shards", f"data.path={args.data}", f"train.max_steps={args.steps}",
                     f"train.eval_every={max(1, args.steps // 2)}", f"train.storage_path={runs}", "train.name=letters"]
        report = run_compare(resolve_preset("letters-ft"), overrides, [args.kappa], out)
    if args.no_serve:
        print("[demo] 3/4 Ray Serve: skipped (--no-serve)", flush=True)
    else:
        print("[demo] 3/4 Ray Serve: both bundles over HTTP, fresh and shared plans", flush=True)
        bundles = {"baseline": runs / "letters-baseline" / "bundle",
                   f"ft-kappa{args.kappa:g}": runs / f"letters-kappa{args.kappa:g}" / "bundle"}
        lines = serve_step(bundles, out, args.port)
        with report.open("a") as f:
            f.write("\n".join(lines) + "\n")
    if owns_ray:
        import ray

        ray.shutdown()
    print(f"\n[demo] 4/4 done in {time.time() - t0:.0f} s. Report: {report}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
