"""Evaluation: a training run's validation metrics (validation.py), honest likelihood estimators
(scoring.py), the lm-evaluation-harness model `ft-ray` (lm.py), the offline task suite (tasks/)
and `ft-ray eval` on Ray (units.py, summary.py, cli.py).

Nothing here reaches the Hugging Face hub: the tasks read local JSONL files, so the harness runs
offline (HF_HUB_OFFLINE / HF_DATASETS_OFFLINE default to 1 when lm.py is imported, before
`datasets` is imported by lm-eval; set them to 0 beforehand to evaluate hub tasks). Importing this
package alone changes no setting: `ft-ray data` may still read the hub.
"""


class EvalError(ValueError):
    """A bad evaluation input (bundle, model argument, task name), with what and where."""
