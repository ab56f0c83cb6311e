"""Metrics sinks of rank 0: metrics.jsonl, wandb, a progress bar or log lines, a loss-curve PNG."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Any


from pretrain.config import Config

def read_records(path: Path) -> list[dict]:
    if not path.is_file():
        return []
    out = []
    for line in path.read_text().splitlines():
        line = line.strip()
        if line:
            try:
                out.append(json.loads(line))
            except ValueError:  # a line cut by a kill mid-write
                break
    return out


class MetricsLogger:
    """Writes one JSON object per logged step to ``<run.dir>/metrics.jsonl`` (rank 0 only)."""

    def __init__(self, cfg: Config, run_dir: Path, enabled: bool, resume_step: int, max_steps: int):
        self.enabled = enabled
        self.path = run_dir / "metrics.jsonl"
        self.plot_path = run_dir / "loss.png"
        self.cfg = cfg
        self.baseline: float | None = None  # unigram entropy of the validation split, on the plot
        self._wandb = None
        self._bar = None
        if not enabled:
            return
        run_dir.mkdir(parents=True, exist_ok=True)
        # Steps logged after the checkpoint we resume from are replayed: drop them so the
        # file reads as if the run had never stopped.
        kept = [r for r in read_records(self.path) if r.get("step", 0) <= resume_step]
        self.path.write_text("".join(json.dumps(r) + "\n" for r in kept))
        self._file = open(self.path, "a")
        progress = cfg.logging.progress
        if progress == "on" or (progress == "auto" and sys.stderr.isatty()):
            from tqdm import tqdm

            self._bar = tqdm(total=max_steps, initial=resume_step, desc="train", dynamic_ncols=True)
        if cfg.logging.wandb != "disabled":
            self._init_wandb(run_dir)

    def _init_wandb(self, run_dir: Path) -> None:
        os.environ.setdefault("WANDB_SILENT", "true")
        import wandb

        self._wandb = wandb.init(
            project=self.cfg.logging.wandb_project,
            name=self.cfg.run.name,
            dir=str(run_dir),
            mode=self.cfg.logging.wandb,
            config=self.cfg.to_dict(),
            resume="allow",
            id=_wandb_id(run_dir),
        )

    def log(self, record: dict[str, Any]) -> None:
        if not self.enabled:
            return
        self._file.write(json.dumps(record) + "\n")
        self._file.flush()
        if self._wandb is not None:
            self._wandb.log({k: v for k, v in record.items() if k != "step"}, step=record["step"])
        if self._bar is not None:
            self._bar.n = record["step"]
            shown = {k: record[k] for k in ("loss", "val_loss", "lr", "tokens_per_s") if k in record}
            self._bar.set_postfix({k: f"{v:.4g}" for k, v in shown.items()}, refresh=True)
        else:
            print(_format(record), flush=True)

    def close(self) -> None:
        if not self.enabled:
            return
        self._file.close()
        if self._bar is not None:
            self._bar.close()
        if self._wandb is not None:
            self._wandb.finish()
        if self.cfg.logging.plot:
            plot_losses(self.path, self.plot_path, baseline=self.baseline)


def _wandb_id(run_dir: Path) -> str:
    """A run id kept in the run directory, so a resumed run continues the same wandb run."""
    f = run_dir / "wandb_id.txt"
    if f.is_file():
        return f.read_text().strip()
    run_id = os.urandom(6).hex()
    f.write_text(run_id)
    return run_id


def _format(record: dict[str, Any]) -> str:
    parts = [f"step {record['step']}"]
    for key, fmt in (
        ("loss", ".4f"),
        ("val_loss", ".4f"),
        ("val_ppl", ".2f"),
        ("lr", ".2e"),
        ("grad_norm", ".3f"),
        ("tokens_per_s", ".0f"),
        ("mfu", ".2%"),
        ("peak_mem_gb", ".2f"),
    ):
        if key in record:
            parts.append(f"{key} {record[key]:{fmt}}")
    return " | ".join(parts)


def plot_losses(metrics: Path, out: Path, baseline: float | None = None) -> None:
    """Training (and validation) loss against step, as a PNG, with the unigram baseline."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    records = read_records(metrics)
    train = [(r["step"], r["loss"]) for r in records if "loss" in r]
    val = [(r["step"], r["val_loss"]) for r in records if "val_loss" in r]
    if not train and not val:
        return
    fig, ax = plt.subplots(figsize=(7, 4), dpi=110)
    if train:
        ax.plot(*zip(*train), label="train loss", lw=1.2)
    if val:
        ax.plot(*zip(*val), "o-", label="validation loss", lw=1.2, ms=4)
    if baseline is not None:
        ax.axhline(baseline, color="grey", ls="--", lw=1, label="unigram baseline")
    ax.set_xlabel("step")
    ax.set_ylabel("cross-entropy (nats/token)")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(out)
    plt.close(fig)
