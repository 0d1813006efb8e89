"""One evaluation as independent units: (model, task, plan seed), each one lm-eval run.

    models = resolve_models(["baseline=runs/a/bundle", "runs/ft-k1/bundle"])
    tasks = resolve_tasks(["ftray"])
    plan = EvalPlan(Settings(num_plans=8, limit=100), models, tasks, seeds=[0, 1, 2])
    claim_out_dir(out, plan)          # refuses a directory holding another evaluation
    results = evaluate_unit(plan.settings, unit, bundle_files(model.path))   # anywhere, no Ray

Everything here is checked before any Ray work, and `evaluate_unit` is the plain function a Ray
worker runs. A baseline has no plan, so it gets one unit per task (the first seed): its scores
are exact. The output directory holds:
  eval.json                          the settings that make results comparable, and each model's
                                     bundle (path, architecture, SHA-256 of its files)
  raw/<model>/<task>/seed<k>.json    lm-eval's results of one unit, written atomically
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

from ft_ray.bundle import ALL_FILES
from ft_ray.eval import EvalError
from ft_ray.eval.scoring import check_num_plans
from ft_ray.eval.tasks import PRESETS, TASK_NAMES

EVAL_FORMAT = "ft-ray-eval/1"
MANIFEST = "eval.json"
OFFLINE_VARS = ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE")


@dataclass(frozen=True)
class Settings:
    """What makes two units' results comparable; a rerun into the same directory must match."""

    num_plans: int  # K: plans per conditional score, IWAE samples per rolling window
    limit: int | float | None = None  # documents per task (a fraction when < 1), as lm-eval's limit
    plan_mode: str = "fresh"  # the `ft-ray` lm-eval model's plan_mode
    proposal: str = "prior"  # the `ft-ray` lm-eval model's proposal
    data_seed: int = 0  # the offline suite's document order (so `limit` takes a seeded sample)
    bootstrap_iters: int = 1000  # lm-eval's stderr over documents (not the interval over plan seeds)
    confirm_run_unsafe_code: bool = False  # lm-eval's consent to execute generated code (humaneval, mbpp)


@dataclass(frozen=True)
class Model:
    """A bundle to evaluate, under the name its results are filed by."""

    name: str
    path: Path
    arch: str  # "baseline" or "free_transformer"
    sha256: str  # of its files: a rerun must not file other weights under the same name

    @property
    def has_plans(self) -> bool:
        return self.arch != "baseline"


@dataclass(frozen=True)
class Unit:
    model: str
    task: str
    seed: int

    @property
    def relpath(self) -> Path:
        return Path("raw") / self.model / self.task / f"seed{self.seed}.json"

    def __str__(self) -> str:
        return f"{self.model} {self.task} seed {self.seed}"


@dataclass
class EvalPlan:
    settings: Settings
    models: list[Model]
    tasks: list[str]
    seeds: list[int]

    def units(self) -> list[Unit]:
        """Every (model, task, seed); a baseline's only seed is the first one."""
        return [Unit(m.name, t, s) for m in self.models for t in self.tasks
                for s in (self.seeds if m.has_plans else self.seeds[:1])]

    def needs_hub(self) -> bool:
        return any(t not in TASK_NAMES for t in self.tasks)


# ------------------------------------------------------------------------------- checks
def check_settings(settings: Settings, seeds: list[int]) -> None:
    try:
        check_num_plans(settings.num_plans)
    except ValueError as e:
        raise EvalError(str(e).replace("num_plans", "--num-plans", 1)) from None
    if not seeds:
        raise EvalError("--seeds is empty: give at least one plan seed")
    if len(set(seeds)) != len(seeds):
        raise EvalError(f"--seeds repeats a seed: {' '.join(map(str, seeds))}")
    if settings.limit is not None and settings.limit <= 0:
        raise EvalError(f"--limit must be > 0, got {settings.limit}")


def parse_limit(text: str) -> int | float:
    """lm-eval's limit: a count of documents, or a fraction of them when below 1."""
    value = float(text)
    return int(value) if value >= 1 and value.is_integer() else value


def bundle_files(path: str | Path) -> dict[str, bytes]:
    """The bytes of a bundle's files: what a worker on any node needs to rebuild it."""
    return {name: (Path(path) / name).read_bytes() for name in ALL_FILES}


def write_bundle_files(files: dict[str, bytes], out: Path) -> Path:
    out.mkdir(parents=True, exist_ok=True)
    for name, data in files.items():
        (out / name).write_bytes(data)
    return out


def resolve_models(specs: list[str]) -> list[Model]:
    """`NAME=PATH` or `PATH` (named after the directory, or its parent's when the directory is
    `bundle`, as training writes it) -> loaded once to check, named, fingerprinted."""
    from ft_ray.eval.lm import load_eval_bundle

    if not specs:
        raise EvalError("--models is empty: give at least one bundle directory")
    models: dict[str, Model] = {}
    for spec in specs:
        name, sep, path_text = spec.partition("=")
        named = bool(sep) and "/" not in name  # "runs/lr=3e-3/bundle" is a path
        path = Path(path_text if named else spec)
        if not named:
            name = path.resolve().parent.name if path.name == "bundle" else path.name
        if not name or "/" in name or name in (".", ".."):
            raise EvalError(f"--models {spec!r}: a model name must be a plain file name (NAME=PATH)")
        model, _ = load_eval_bundle(path)  # EvalError naming the path and why
        if name in models:
            raise EvalError(f"--models: two bundles named {name!r} ({models[name].path}, {path}); "
                            "name them with NAME=PATH")
        digest = hashlib.sha256()
        for data in bundle_files(path).values():
            digest.update(hashlib.sha256(data).digest())
        models[name] = Model(name, path.resolve(), model.cfg.arch, digest.hexdigest())
    return list(models.values())


def hub_enabled() -> bool:
    """Whether this process may reach the Hugging Face hub (both offline switches off)."""
    return all(os.environ.get(v, "1").lower() in ("0", "false", "no", "off") for v in OFFLINE_VARS)


def resolve_tasks(names: list[str]) -> list[str]:
    """Comma-separated names and presets (`ftray`, `paper`) -> task names, in order, once each.
    A name outside the offline suite must be an lm-eval task and needs the hub."""
    out: list[str] = []
    for text in names:
        for name in filter(None, (n.strip() for n in text.split(","))):
            out += [t for t in PRESETS.get(name, (name,)) if t not in out]
    if not out:
        raise EvalError("--tasks is empty: give task names or a preset")
    outside = [t for t in out if t not in TASK_NAMES]
    if not outside:
        return out
    known = f"known offline: {', '.join(TASK_NAMES)}; presets: {', '.join(PRESETS)}"
    if not hub_enabled():
        raise EvalError(f"task(s) {', '.join(outside)} not in the offline suite ({known}); lm-eval's "
                        "hub tasks need HF_HUB_OFFLINE=0 HF_DATASETS_OFFLINE=0 and a network "
                        "that reaches huggingface.co")
    from ft_ray.eval.tasks import task_manager

    with tempfile.TemporaryDirectory() as tmp:  # lm-eval's own tasks only: no suite YAMLs
        registered = set(task_manager(tmp, include_defaults=True).all_tasks)
    unknown = [t for t in outside if t not in registered]
    if unknown:
        raise EvalError(f"unknown task(s) {', '.join(map(repr, unknown))}: neither offline ({known}) "
                        "nor lm-eval's (`lm-eval ls tasks` lists those)")
    return out


# ------------------------------------------------------------------------------- the directory
def manifest_of(plan: EvalPlan) -> dict:
    return {"format": EVAL_FORMAT, "settings": dataclasses.asdict(plan.settings),
            "models": {m.name: {"path": str(m.path), "arch": m.arch, "sha256": m.sha256}
                       for m in plan.models}}


def claim_out_dir(out: Path, plan: EvalPlan) -> None:
    """Create `out`, or accept it when it holds this evaluation (same settings; a model name it
    knows has the same weights); new models, tasks and seeds are added to its manifest.
    EvalError in one line otherwise."""
    path = out / MANIFEST
    mine = manifest_of(plan)
    if path.is_file():
        theirs = _read_manifest(path)
        changed = [f"{k} {theirs['settings'].get(k)!r} there, {v!r} now"
                   for k, v in mine["settings"].items() if theirs["settings"].get(k) != v]
        changed += [f"model {n!r} has other weights than {theirs['models'][n]['path']}"
                    for n, m in mine["models"].items()
                    if n in theirs["models"] and theirs["models"][n]["sha256"] != m["sha256"]]
        if changed:
            raise EvalError(f"{out} holds a different evaluation ({'; '.join(changed)}); use another --out")
        mine["models"] = {**theirs["models"], **mine["models"]}
    elif out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise EvalError(f"{out} exists and is not an ft-ray evaluation (no {MANIFEST}); use another --out")
    out.mkdir(parents=True, exist_ok=True)
    write_json_atomic(path, mine)


def _read_manifest(path: Path) -> dict:
    try:
        theirs = json.loads(path.read_text())
    except ValueError:
        theirs = None
    if not isinstance(theirs, dict) or theirs.get("format") != EVAL_FORMAT:
        raise EvalError(f"{path}: not an ft-ray evaluation manifest; use another --out")
    return theirs


def write_json_atomic(path: Path, obj) -> None:
    """Write JSON to a temporary sibling, then rename: a reader never sees half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        tmp.write_text(json.dumps(obj, indent=2))
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def finished(out: Path, unit: Unit) -> bool:
    return (out / unit.relpath).is_file()


# ------------------------------------------------------------------------------- one unit
def evaluate_unit(settings: Settings, unit: Unit, files: dict[str, bytes]) -> dict:
    """lm-eval's results dict (JSON-ready) of one unit: the bundle from `files`, the offline suite
    written locally, the `ft-ray` model at plan seed `unit.seed`. Runs in any process."""
    from lm_eval.utils import handle_non_serializable

    from ft_ray.eval.lm import FtRayLM
    from ft_ray.eval.tasks import evaluate_tasks, write_task_data

    with tempfile.TemporaryDirectory(prefix="ft-ray-eval-") as tmp:
        bundle = write_bundle_files(files, Path(tmp) / "bundle")
        suite = write_task_data(Path(tmp) / "tasks", settings.data_seed)
        lm = FtRayLM(bundle=str(bundle), num_plans=settings.num_plans, plan_seed=unit.seed,
                     plan_mode=settings.plan_mode, proposal=settings.proposal)
        results = evaluate_tasks(lm, [unit.task], suite, limit=settings.limit,
                                 include_defaults=unit.task not in TASK_NAMES,
                                 bootstrap_iters=settings.bootstrap_iters, log_samples=False,
                                 confirm_run_unsafe_code=settings.confirm_run_unsafe_code)
    results["config"]["model_args"] = (f"num_plans={settings.num_plans},plan_seed={unit.seed},"
                                       f"plan_mode={settings.plan_mode},proposal={settings.proposal}")
    return json.loads(json.dumps(results, default=handle_non_serializable))



def downstream_metrics(model, tokenizer, tasks: list[str], limit: int, num_plans: int,
                       seed: int = 0, data_seed: int = 0) -> dict[str, float]:
    """The offline suite's `tasks` on an in-memory model: {"eval/<task>/<metric>": value}, what a
    training run reports at each evaluation (train.eval_tasks) and a sweep may optimise. The
    same lm-eval model and scoring as `ft-ray eval`: plan seed `seed`, K = `num_plans`, the
    suite's documents from `data_seed` (the same documents whatever the plan seed)."""
    from ft_ray.eval.lm import FtRayLM
    from ft_ray.eval.summary import metric_values
    from ft_ray.eval.tasks import evaluate_tasks, write_task_data

    with tempfile.TemporaryDirectory(prefix="ft-ray-eval-") as tmp:
        suite = write_task_data(Path(tmp) / "tasks", data_seed)
        lm = FtRayLM(model=model, tokenizer=tokenizer, num_plans=num_plans, plan_seed=seed)
        results = evaluate_tasks(lm, list(tasks), suite, limit=limit, seed=data_seed, bootstrap_iters=0,
                                 log_samples=False)
    return {f"eval/{task}/{name}": float(value) for task in tasks
            for name, value in metric_values(results, task).items()}
