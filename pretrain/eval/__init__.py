"""Evaluation of checkpoints: perplexity and bits per byte on the prepared validation split
(:mod:`pretrain.eval.perplexity`), and lm-evaluation-harness on a Hugging Face export
(:mod:`pretrain.eval.harness`, with offline tasks built from the built-in corpus:
:mod:`pretrain.eval.local_data`, pretrain/eval/tasks).

Results go to ``<run dir>/eval/`` (the folder above the checkpoints folder), one file per
evaluation as lm-eval's ``results_<date>.json``: ``perplexity_<step>_<date>.json`` and
``lm_eval_<step>_<date>.json``, never overwritten, so that evaluating a checkpoint again (other
``--tasks``, ``--limit`` or ``--samples``) keeps the earlier results. ``import pretrain.eval``
stays light: torch, transformers and lm_eval load with the submodules that need them.
"""

from __future__ import annotations

import json
import os
from datetime import datetime, timezone
from pathlib import Path
from typing import Any


def checkpoint_step(step_dir: Path) -> int:
    """The training step of the checkpoint step folder ``step_dir`` (its train_state.json)."""
    from pretrain.train.checkpoint import read_train_state

    return int(read_train_state(step_dir)["step"])


def results_files(step_dir: Path, kind: str) -> list[Path]:
    """The ``kind`` results ("perplexity", "lm_eval") of the checkpoint step folder ``step_dir``
    (``<run dir>/checkpoints/step-<N>``) under ``<run dir>/eval/``, oldest first (the newest is
    the last)."""
    folder = _eval_dir(step_dir)
    return sorted(folder.glob(f"{kind}_{checkpoint_step(step_dir)}_*.json")) if folder.is_dir() else []


def write_results(step_dir: Path, kind: str, record: dict[str, Any]) -> Path:
    """Write ``record`` as indented JSON (non-JSON values as strings) to a new file
    ``<run dir>/eval/<kind>_<step>_<date>.json`` for the checkpoint step folder ``step_dir``
    and return its path. ``<date>`` is the UTC time to the microsecond (``2025-01-31T12-00-00.000000``,
    lm-eval's ``results_<date>.json`` form; names sort in time order); an existing file is never
    replaced. The file appears whole or not at all: written beside it under a temporary name,
    then renamed."""
    folder = _eval_dir(step_dir)
    if folder.exists() and not folder.is_dir():
        from pretrain.train.checkpoint import CheckpointError

        raise CheckpointError(f"{folder}: a file is where the evaluation results folder goes; move it away")
    folder.mkdir(parents=True, exist_ok=True)
    step = checkpoint_step(step_dir)
    tmp = folder / f".{kind}_{step}.{os.getpid()}.tmp"
    try:
        with open(tmp, "w") as f:
            f.write(json.dumps(record, indent=2, default=str) + "\n")
            f.flush()
            os.fsync(f.fileno())
        path = _publish(tmp, folder, kind, step)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def _publish(tmp: Path, folder: Path, kind: str, step: int) -> Path:
    """Give the written file ``tmp`` a new dated name: a hard link, which fails rather than
    replace a file another evaluation linked in the same microsecond (then the next one is
    tried). A filesystem without hard links gets a rename to a name not yet taken."""
    while True:
        path = folder / f"{kind}_{step}_{datetime.now(timezone.utc):%Y-%m-%dT%H-%M-%S.%f}.json"
        try:
            os.link(tmp, path)
            return path
        except FileExistsError:
            continue
        except OSError:  # no hard links here
            if not path.exists():
                os.replace(tmp, path)
                return path


def _eval_dir(step_dir: Path) -> Path:
    return step_dir.resolve().parent.parent / "eval"
