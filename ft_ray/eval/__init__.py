"""Evaluation: honest likelihood estimators (scoring.py), the lm-evaluation-harness model `ft-ray`
(lm.py) and the offline task suite (tasks/).

Nothing here reaches the Hugging Face hub: the tasks read local JSONL files, so the harness runs
offline (HF_HUB_OFFLINE / HF_DATASETS_OFFLINE default to 1 here, before `datasets` is imported
by lm-eval; set them to 0 beforehand to evaluate hub tasks).
"""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")


class EvalError(ValueError):
    """A bad evaluation input (bundle, model argument, task name), with what and where."""
