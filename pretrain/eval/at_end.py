"""``eval.at_end``: score the final checkpoint of `pretrain train` on rank 0, once the ranks
have finished training: perplexity and bits per byte on the validation split, and
lm-evaluation-harness on the checkpoint's export (eval.tasks). One record with ``eval/...`` keys
is appended to metrics.jsonl; the full results go to ``<run dir>/eval/`` as `pretrain eval`
writes them.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Callable

from pretrain.config import Config


def check(cfg: Config):
    """Before training: the lm-eval TaskManager when eval.at_end names tasks (None otherwise);
    ConfigError naming eval.tasks for an unknown task or a missing lm-eval."""
    if not (cfg.eval.at_end and cfg.eval.tasks):
        return None
    from pretrain.eval.harness import check_tasks

    return check_tasks(list(cfg.eval.tasks), field="eval.tasks")


def evaluate(cfg: Config, device: str, log: Callable[[str], None] = print, manager=None) -> dict[str, Any]:
    """Score the newest complete checkpoint under cfg.checkpoint_dir on ``device``; returns and
    appends to ``<run.dir>/metrics.jsonl`` the record ``{"step", "eval/val_loss",
    "eval/val_ppl", "eval/bits_per_byte", "eval/<task>/<metric>": ...}``."""
    from pretrain.eval import checkpoint_step, write_results
    from pretrain.eval.perplexity import perplexity
    from pretrain.train.checkpoint import resolve_checkpoint

    step_dir = resolve_checkpoint(cfg.checkpoint_dir)
    step = checkpoint_step(step_dir)
    scores = perplexity(step_dir, device=device)
    write_results(step_dir, "perplexity", {"step": step, **scores})
    record: dict[str, Any] = {"step": step}
    record.update({f"eval/{k}": scores[k] for k in ("val_loss", "val_ppl", "bits_per_byte")})
    log(f"eval at step {step}: {scores['bits_per_byte']:.4f} bits/byte, perplexity {scores['val_ppl']:.2f}")
    if cfg.eval.tasks:
        from pretrain.eval import harness

        results = harness.without_samples(
            harness.run_lm_eval(
                step_dir, list(cfg.eval.tasks), cfg.eval.limit or None, device, manager=manager, field="eval.tasks"
            )
        )
        write_results(step_dir, "lm_eval", results)
        record.update({f"eval/{k}": v for k, v in harness.summary(results).items()})
        log(harness.table(results))
    with open(Path(cfg.run.dir) / "metrics.jsonl", "a") as f:
        f.write(json.dumps(record) + "\n")
    return record
