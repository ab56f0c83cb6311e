"""lm-evaluation-harness on a checkpoint: export it (pretrain/convert) to a temporary Hugging
Face folder and score that folder with ``lm_eval.simple_evaluate`` (model ``hf``, loaded with
``trust_remote_code=True`` so any exported family loads, fp32, batch size 1).

Tasks are lm-eval task names: the two shipped in pretrain/eval/tasks (``kjv_chapter_ppl``,
``kjv_verse_choice``, built from the built-in corpus, no hub access needed: see
pretrain/eval/local_data.py) or any task lm-eval knows whose dataset is reachable (cached).

Tokens as in training: the exported tokenizer's BOS is our end-of-document token, and lm-eval
runs with ``add_bos_token=False`` so that it is never added twice: a rolling document is scored
after exactly one EOS (lm-eval's prefix token), like a training document after the previous
one's end; a multiple-choice context starts without one, as a training sample may start
mid-stream.
"""

from __future__ import annotations

import logging
import tempfile
from pathlib import Path
from typing import Any

from pretrain.config import ConfigError

TASKS_DIR = Path(__file__).resolve().parent / "tasks"
"""The shipped task YAMLs (registered through lm-eval's ``TaskManager(include_path=...)``)."""
SHIPPED_TASKS = ("kjv_chapter_ppl", "kjv_verse_choice")


def task_manager(field: str = "--tasks"):
    """An lm-eval TaskManager that knows lm-eval's own tasks and the shipped ones; ConfigError
    naming ``field`` when lm-eval is not installed."""
    try:
        from lm_eval.tasks import TaskManager
    except ImportError:
        raise ConfigError(f"{field}: lm-evaluation-harness is not installed: pip install 'pretrain[eval]'") from None
    # lm-eval logs a notice per custom-dataset task and per metric default at WARNING level
    logging.getLogger("lm_eval").setLevel(logging.ERROR)
    return TaskManager(include_path=str(TASKS_DIR))


def check_tasks(tasks: list[str], field: str = "--tasks", manager=None):
    """The TaskManager after checking that every name in ``tasks`` is a task, group or tag it
    knows; ConfigError naming ``field`` and the first unknown name otherwise (before any export
    or training, the check takes a few seconds of YAML indexing)."""
    if not tasks:
        raise ConfigError(f"{field}: name at least one lm-eval task, e.g. {','.join(SHIPPED_TASKS)}")
    manager = manager or task_manager(field)
    known = set(manager.all_tasks)
    for name in tasks:
        if name not in known:
            shipped = ", ".join(SHIPPED_TASKS)
            raise ConfigError(f"{field}: unknown lm-eval task {name!r} (shipped offline tasks: {shipped})")
    return manager


def run_lm_eval(
    checkpoint: Path,
    tasks: list[str],
    limit: int | None = None,
    device: str = "cpu",
    log_samples: bool = False,
    manager=None,
    field: str = "--tasks",
) -> dict[str, Any]:
    """Score the checkpoint at or under ``checkpoint`` on lm-eval ``tasks``, at most ``limit``
    documents per task (None: all). Returns lm-eval's results dict (``results`` per task:
    ``{"acc,none": ..., "word_perplexity,none": ...}``; ``samples`` per task with
    ``log_samples``). Raises ConfigError naming ``field`` for an unknown task or one whose
    data is neither cached nor reachable, ConvertError / CheckpointError for a checkpoint that
    does not export."""
    from pretrain.config import config_from_dict
    from pretrain.convert import export_hf
    from pretrain.train.checkpoint import read_saved_config, resolve_checkpoint

    manager = check_tasks(tasks, field, manager)
    if limit is not None and limit < 1:
        raise ConfigError(f"--limit: must be >= 1, got {limit}")
    import lm_eval
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    seq_len = config_from_dict(read_saved_config(resolve_checkpoint(Path(checkpoint)))).data.seq_len
    with tempfile.TemporaryDirectory(prefix="pretrain-lm-eval-") as tmp:
        folder = Path(tmp) / "hf"
        export_hf(Path(checkpoint), folder)
        model_args = {
            "pretrained": str(folder),
            "trust_remote_code": True,
            "dtype": "float32",
            "add_bos_token": False,
            "max_length": seq_len,  # rolling windows of the trained length, for every family
        }
        try:
            return lm_eval.simple_evaluate(
                model="hf", model_args=model_args, tasks=list(tasks), limit=limit, device=device, batch_size=1,
                task_manager=manager, log_samples=log_samples, verbosity="ERROR",
            )
        except ConnectionError as exc:  # datasets' error for a hub dataset that is not cached
            raise ConfigError(
                f"{field}: {exc}; run the task once where the hub is reachable to cache its data, "
                f"or use the offline tasks {', '.join(SHIPPED_TASKS)}"
            ) from None


def summary(results: dict[str, Any]) -> dict[str, float]:
    """``{"<task>/<metric>": value}`` of the numeric results (lm-eval's ``,none`` filter suffix
    and standard errors dropped): what `pretrain train` logs with eval.at_end."""
    out = {}
    for task, metrics in results["results"].items():
        for key, value in metrics.items():
            name = key.split(",")[0]
            if isinstance(value, (int, float)) and not isinstance(value, bool) and not name.endswith("_stderr"):
                out[f"{task}/{name}"] = float(value)
    return out


def without_samples(results: dict[str, Any]) -> dict[str, Any]:
    """lm-eval's results without the per-sample records (the part worth keeping as JSON)."""
    return {k: v for k, v in results.items() if k != "samples"}


def table(results: dict[str, Any]) -> str:
    """lm-eval's own markdown table of the results."""
    from lm_eval.utils import make_table

    return make_table(results)
