"""Evaluation of checkpoints: perplexity and bits per byte on the prepared validation split
(:mod:`pretrain.eval.perplexity`), and lm-evaluation-harness on a Hugging Face export
(:mod:`pretrain.eval.harness`, with offline tasks built from the built-in corpus:
:mod:`pretrain.eval.local_data`, pretrain/eval/tasks).

Results go to ``<run dir>/eval/`` (the folder above the checkpoints folder):
``perplexity_<step>.json`` and ``lm_eval_<step>.json``. ``import pretrain.eval`` stays light:
torch, transformers and lm_eval load with the submodules that need them.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any


def checkpoint_step(step_dir: Path) -> int:
    """The training step of the checkpoint step folder ``step_dir`` (its train_state.json)."""
    from pretrain.train.checkpoint import read_train_state

    return int(read_train_state(step_dir)["step"])


def results_path(step_dir: Path, kind: str) -> Path:
    """``<run dir>/eval/<kind>_<step>.json`` for the checkpoint step folder ``step_dir``
    (``<run dir>/checkpoints/step-<N>``)."""
    return step_dir.resolve().parent.parent / "eval" / f"{kind}_{checkpoint_step(step_dir)}.json"


def write_json(path: Path, record: dict[str, Any]) -> Path:
    """``record`` as indented JSON at ``path`` (folders created); non-JSON values as strings."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(record, indent=2, default=str) + "\n")
    return path
