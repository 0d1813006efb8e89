"""The offline task suite: lm-eval task YAMLs over data ft-ray writes itself (no download).

    include_path = write_task_data(out_dir, seed=0)
    evaluate_tasks(lm, ["ftray"], include_path, limit=100)   # or the task names below

Tasks (tag `ftray`):
  ftray_arith_gen     held-out arithmetic in words, generated greedily; exact_match
  ftray_arith_choice  the same problems, the right value among 4 by likelihood; acc, acc_norm
  ftray_arith_ppl     rolling log-likelihood of held-out arithmetic documents; byte_perplexity
                      and bits_per_byte (for an FT from the IWAE bound: upper bounds)
  ftray_letters       the paper's letter task from its prompt; valid (letters.check_body)
The arithmetic problems are those the `arith` synthetic task never trains on (ft_ray/data/arith.py),
so a model trained with `ft-ray data synthetic --task arith` is scored on held-out problems.
The YAML templates (templates/) get the data directory written into `dataset_kwargs.data_files`.
Presets (`ft-ray eval --tasks`): `ftray`, the four above; `paper`, the paper's downstream tasks as
lm-eval names them (PAPER_TASKS), which read the Hugging Face hub.
"""

from __future__ import annotations

import json
from importlib import resources
from pathlib import Path

import numpy as np

from ft_ray.data import arith
from ft_ray.data.letters import BODY_LEN, LETTERS, check_body
from ft_ray.eval import EvalError

TAG = "ftray"
TASK_NAMES = ("ftray_arith_gen", "ftray_arith_choice", "ftray_arith_ppl", "ftray_letters")
# what each reports (summary.metric_values names), e.g. as a sweep's objective eval/<task>/<metric>
TASK_METRICS = {"ftray_arith_gen": ("exact_match",), "ftray_arith_choice": ("acc", "acc_norm"),
                "ftray_arith_ppl": ("byte_perplexity", "bits_per_byte"), "ftray_letters": ("valid",)}
# The paper's downstream tasks, as lm-eval names them: the five its text names (HumanEval+, MBPP,
# GSM8K, MMLU, CSQA) and the multiple-choice suite we read in its tables (not checked against
# the paper here). They read the Hugging Face dataset hub: not runnable offline. humaneval_plus and
# mbpp execute generated code (lm-eval's confirm_run_unsafe_code).
PAPER_TASKS = ("humaneval_plus", "mbpp", "gsm8k", "mmlu", "commonsense_qa", "hellaswag", "winogrande",
               "arc_easy", "arc_challenge", "openbookqa", "piqa", "social_iqa", "race")
CODE_TASKS = ("humaneval_plus", "mbpp")  # of those, the ones that execute generated code
PRESETS = {"paper": PAPER_TASKS, TAG: TASK_NAMES}  # names that expand to a task list
# Accuracy of a uniform guess, for the tasks that have one (multiple choice: 1 / number of choices)
CHANCE_ACCURACY = {"ftray_arith_choice": 0.25, "mmlu": 0.25, "commonsense_qa": 0.2, "hellaswag": 0.25,
                   "winogrande": 0.5, "arc_easy": 0.25, "arc_challenge": 0.25, "openbookqa": 0.25,
                   "piqa": 0.5, "social_iqa": 1 / 3, "race": 0.25}
NUM_CHOICES = 4
LETTER_DOCS_PER_LETTER = 2
PLACEHOLDER = "@DATA_DIR@"


def letters_results(doc: dict, results: list[str]) -> dict[str, float]:
    """lm-eval process_results of ftray_letters: the first 64 generated characters must be a
    valid body for the prompt's letter (as eval/validation.py's score_group judges samples)."""
    return {"valid": float(check_body(results[0][:BODY_LEN], doc["letter"]).valid)}


# ------------------------------------------------------------------------------- documents
def _distractors(value: int, operands: tuple[int, ...], ops: tuple[str, ...],
                 rng: np.random.Generator) -> list[int]:
    """NUM_CHOICES - 1 wrong values: the usual slips first, then random nearby values."""
    left_to_right = operands[0]
    for op, x in zip(ops, operands[1:]):
        left_to_right = left_to_right + x if op == "plus" else left_to_right * x
    swapped = arith.evaluate(operands, tuple("times" if o == "plus" else "plus" for o in ops))
    slips = [left_to_right, swapped, value + 1, value - 1, value + 2, value + 10]
    wrong = [v for v in dict.fromkeys(slips) if v != value and 0 <= v < 1000]
    rng.shuffle(wrong)
    while len(wrong) < NUM_CHOICES - 1:  # rare: pad with random values that are still wrong
        v = int(rng.integers(0, 1000))
        if v != value and v not in wrong:
            wrong.append(v)
    return [int(v) for v in wrong[:NUM_CHOICES - 1]]


def arith_documents(seed: int) -> tuple[list[dict], list[dict], list[dict]]:
    """(generation docs, multiple-choice docs, perplexity docs) over every held-out problem, in an
    order shuffled by `seed` (so `limit` takes a seeded sample)."""
    rng = np.random.default_rng(seed)
    heldout = arith.heldout_problems()
    gen, choice, text = [], [], []
    for k in rng.permutation(len(heldout)):
        prompt, value, operands, ops = heldout[k]
        answer = arith.number_words(value)
        gen.append({"prompt": prompt, "answer": answer})
        values = [value, *_distractors(value, operands, ops, rng)]
        order = rng.permutation(NUM_CHOICES)
        choice.append({"prompt": prompt, "choices": [arith.number_words(values[i]) for i in order],
                       "label": int(np.flatnonzero(order == 0)[0])})
        text.append({"text": prompt + answer})
    return gen, choice, text


def letter_documents(seed: int) -> list[dict]:
    """LETTER_DOCS_PER_LETTER prompts per letter, in an order shuffled by `seed`."""
    docs = [{"letter": c} for c in LETTERS for _ in range(LETTER_DOCS_PER_LETTER)]
    return [docs[i] for i in np.random.default_rng(seed).permutation(len(docs))]


def _write_jsonl(path: Path, docs: list[dict]) -> None:
    path.write_text("".join(json.dumps(d) + "\n" for d in docs))


def write_task_data(out_dir: str | Path, seed: int = 0) -> Path:
    """Write the suite's JSONL files and YAMLs pointing at them into `out_dir`; returns the
    include_path for lm-eval's TaskManager. Deterministic in `seed`; rewriting is harmless."""
    out = Path(out_dir).resolve()
    (out / "data").mkdir(parents=True, exist_ok=True)
    gen, choice, text = arith_documents(seed)
    for name, docs in (("arith", gen), ("arith_choice", choice), ("arith_text", text),
                       ("letters", letter_documents(seed))):
        _write_jsonl(out / "data" / f"{name}.jsonl", docs)
    data_dir = json.dumps(str(out / "data"))[1:-1]  # escaped for a double-quoted YAML string
    for name in TASK_NAMES:
        template = resources.files(__package__).joinpath("templates", f"{name}.yaml").read_text()
        (out / f"{name}.yaml").write_text(template.replace(PLACEHOLDER, data_dir))
    return out


# ------------------------------------------------------------------------------- running
def task_manager(include_path: str | Path, include_defaults: bool = False):
    """lm-eval's TaskManager over `include_path`, plus lm-eval's built-in tasks (which need the
    hub, and take ~20 s to index) when `include_defaults`."""
    from lm_eval.tasks import TaskManager

    return TaskManager(include_path=str(include_path), include_defaults=include_defaults)


def check_tasks(names: list[str], manager) -> None:
    """EvalError naming every task (or tag) that `manager` does not know."""
    known = set(manager.all_tasks)
    unknown = [n for n in names if n not in known]
    if unknown:
        raise EvalError(f"unknown task(s) {', '.join(map(repr, unknown))}; known: {', '.join(sorted(known))}")


def evaluate_tasks(lm, names: list[str], include_path: str | Path, limit: int | float | None = None,
                   seed: int = 0, include_defaults: bool = False, **kwargs) -> dict:
    """lm_eval.simple_evaluate on the suite at `include_path` (see write_task_data), and on
    lm-eval's built-in tasks when `include_defaults`; `kwargs` go to simple_evaluate (e.g.
    bootstrap_iters, log_samples). Returns its results dict."""
    import lm_eval

    manager = task_manager(include_path, include_defaults)
    check_tasks(list(names), manager)
    return lm_eval.simple_evaluate(model=lm, tasks=list(names), task_manager=manager, limit=limit,
                                   random_seed=seed, numpy_random_seed=seed, torch_random_seed=seed,
                                   fewshot_random_seed=seed, **kwargs)
