"""Checkpoints: one DCP directory per saved step, written atomically.

Layout of ``<checkpoint dir>/step-00000100/``::

    .metadata, *.distcp   model + optimizer (DCP; any parallel layout can load them)
    rng/rank<R>.pt        RNG states of each rank (torch, CUDA, numpy, python)
    train_state.json      step, data position, run bookkeeping
    config.toml           the resolved config of the run
    tokenizer.model       the tokenizer, so the folder alone can generate text
    manifest.json         every file's size; written last

A step is first written to ``step-00000100.tmp`` and renamed when complete, so a folder
without the suffix is complete unless its files were damaged later; the manifest catches
truncation, a failing load catches the rest, and either way the step is reported and the
next older one is tried.

Resuming under a changed config: the data position (``consumed_samples`` of one global sample
order, see :class:`~pretrain.data.loader.PackedLoader`) stays exact under any global batch size,
micro-batch size or parallel layout, and is unaffected by the optimizer, schedule, logging,
evaluation and checkpoint settings. Everything that defines the order itself (the prepared token
streams, data.seq_len, data.weights, train.seed) must be unchanged: a sample index of a 32-token
order names other tokens in a 64-token one, and a mid-epoch position in a shuffled order has no
exact equivalent in another. :func:`check_data_order` and :func:`check_prepared_data` refuse such
a resume with a one-line :class:`~pretrain.config.ConfigError` before anything is written.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import shutil
import tomllib
import warnings
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.state_dict import (
    get_model_state_dict,
    get_state_dict,
    set_model_state_dict,
    set_state_dict,
)

from pretrain.config import Config, ConfigError
from pretrain.data.blend import quantize_weights
from pretrain.data.meta import prepared_datasets

PREFIX = "step-"
TMP_SUFFIX = ".tmp"


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be used; the message names the folder and the reason."""


def step_dir(root: Path, step: int) -> Path:
    return root / f"{PREFIX}{step:08d}"


def _rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def _barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_file(path: Path, data: bytes) -> None:
    with open(path, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def _dcp(op: str, state: dict, path: Path) -> None:
    """dcp.save / dcp.load; a single process passes no_dist and silences DCP's notice of it."""
    no_dist = not dist.is_initialized()
    with warnings.catch_warnings():
        if no_dist:
            warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        getattr(dcp, op)(state, checkpoint_id=str(path), no_dist=no_dist)


def rng_state() -> dict[str, Any]:
    state = {
        "torch": torch.get_rng_state(),
        "numpy": np.random.get_state(),
        "python": random.getstate(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def save_checkpoint(
    root: Path,
    step: int,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    train_state: dict[str, Any],
    config_toml: str,
    tokenizer_path: Path | None,
    keep_last: int,
) -> Path:
    """Write step ``step`` atomically and prune all but the newest ``keep_last``. Collective."""
    final = step_dir(root, step)
    tmp = final.with_name(final.name + TMP_SUFFIX)
    if _rank() == 0:
        root.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)
        (tmp / "rng").mkdir(parents=True)
    _barrier()
    model_sd, optim_sd = get_state_dict(model, optimizer)
    _dcp("save", {"model": model_sd, "optim": optim_sd}, tmp)
    torch.save(rng_state(), tmp / "rng" / f"rank{_rank()}.pt")
    _barrier()
    if _rank() == 0:
        _write_file(tmp / "train_state.json", json.dumps({"step": step, **train_state}, indent=1).encode())
        _write_file(tmp / "config.toml", config_toml.encode())
        if tokenizer_path is not None:
            shutil.copyfile(tokenizer_path, tmp / "tokenizer.model")
        sizes = {
            str(p.relative_to(tmp)): p.stat().st_size for p in sorted(tmp.rglob("*")) if p.is_file()
        }
        _write_file(tmp / "manifest.json", json.dumps({"step": step, "files": sizes}, indent=1).encode())
        _fsync_dir(tmp)
        if final.exists():  # a re-run of the same step replaces the older copy
            shutil.rmtree(final)
        os.rename(tmp, final)
        _fsync_dir(root)
        prune(root, keep_last)
    _barrier()
    return final


def complete_steps(root: Path) -> list[Path]:
    """Checkpoint folders whose write finished (renamed), newest first."""
    if not root.is_dir():
        return []
    dirs = [p for p in root.iterdir() if p.is_dir() and p.name.startswith(PREFIX) and p.name[len(PREFIX) :].isdigit()]
    return sorted(dirs, key=lambda p: int(p.name[len(PREFIX) :]), reverse=True)


def prune(root: Path, keep_last: int) -> None:
    """Delete all but the newest ``keep_last`` complete checkpoints and stale partial writes."""
    for old in complete_steps(root)[keep_last:]:
        shutil.rmtree(old, ignore_errors=True)
    for tmp in root.glob(f"{PREFIX}*{TMP_SUFFIX}"):
        shutil.rmtree(tmp, ignore_errors=True)


def verify(path: Path) -> None:
    """Raise CheckpointError if a file listed in the manifest is missing or has another size."""
    manifest = path / "manifest.json"
    if not manifest.is_file():
        raise CheckpointError(f"checkpoint {path}: manifest.json is missing")
    try:
        files = json.loads(manifest.read_text())["files"]
    except (ValueError, KeyError) as exc:
        raise CheckpointError(f"checkpoint {path}: manifest.json is unreadable ({exc})") from None
    for name, size in files.items():
        f = path / name
        if not f.is_file():
            raise CheckpointError(f"checkpoint {path}: {name} is missing")
        if f.stat().st_size != size:
            raise CheckpointError(f"checkpoint {path}: {name} has {f.stat().st_size} bytes, expected {size}")


def read_train_state(path: Path) -> dict[str, Any]:
    """train_state.json of step folder ``path``; CheckpointError when it is not valid JSON."""
    try:
        return json.loads((path / "train_state.json").read_text())
    except (ValueError, OSError) as exc:
        raise CheckpointError(f"checkpoint {path}: train_state.json is unreadable ({exc})") from None


def _load_state(path: Path, state: dict) -> None:
    """dcp.load into ``state`` in place, any failure as a one-line CheckpointError."""
    verify(path)
    try:
        _dcp("load", state, path)
    except (Exception, CheckpointException) as exc:  # DCP's own exception is a BaseException
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise CheckpointError(f"checkpoint {path}: cannot be loaded ({first})") from None


def load_checkpoint(path: Path, model: nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    """Load model and optimizer state and this rank's RNG from ``path``; returns train_state."""
    model_sd, optim_sd = get_state_dict(model, optimizer)
    state = {"model": model_sd, "optim": optim_sd}
    _load_state(path, state)
    set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"])
    rng_file = path / "rng" / f"rank{_rank()}.pt"
    if rng_file.is_file():
        set_rng_state(torch.load(rng_file, weights_only=False))
    return read_train_state(path)


def load_model_weights(path: Path, model: nn.Module, tokenizer_sha256: str) -> dict[str, Any]:
    """Load only the model parameters of a checkpoint into ``model``: the starting point of a new
    run (torchtitan's ``initial_load_model_only``, Megatron's ``--finetune``), whose optimizer,
    schedule, step and data order start fresh, e.g. to continue at another data.seq_len.

    ``path``: a step folder, a checkpoints folder or a run folder (its newest step), written by
    any parallel layout; ``model`` may be in any layout. ``tokenizer_sha256``: the SHA-256 of the
    new run's tokenizer. Returns the checkpoint's train_state. Raises ConfigError when the
    checkpoint was trained with another tokenizer (its embedding rows would name other tokens),
    CheckpointError when it is damaged or holds another architecture.
    """
    step = resolve_checkpoint(Path(path))
    verify(step)
    saved = hashlib.sha256((step / "tokenizer.model").read_bytes()).hexdigest()
    if saved != tokenizer_sha256:
        raise ConfigError(
            f"data.tokenizer: the run's tokenizer is not the one checkpoint {step} was trained with, "
            "so its embeddings would name other tokens; prepare the data with that checkpoint's tokenizer.model"
        )
    state = {"model": get_model_state_dict(model)}
    _load_state(step, state)
    set_model_state_dict(model, state["model"])
    return read_train_state(step)


def resume_latest(
    root: Path,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    report: Callable[[str], None] = print,
    check: Callable[[Path], None] | None = None,
) -> dict[str, Any] | None:
    """Load the newest usable checkpoint under ``root``; damaged ones are reported and skipped.

    ``check(path)`` runs on each candidate before it is loaded: a CheckpointError from it skips
    the candidate like a damaged file, any other error (a refused config change) ends the search.
    Returns its train_state, or None when there is none to resume from.
    """
    for path in complete_steps(root):
        try:
            if check is not None:
                check(path)
            state = load_checkpoint(path, model, optimizer)
        except CheckpointError as exc:
            report(f"skipping {exc}")
            continue
        return state
    return None


# ------------------------------------------------------------ resuming under a changed config

DATA_ORDER_FIELDS = (
    "data.sources",
    "data.text_field",
    "data.tokenizer",
    "data.tokenizer_type",
    "data.vocab_size",
    "data.valid_fraction",
    "data.seq_len",
    "train.seed",
)
"""Config fields that fix the sample order a saved data position counts in: the inputs of
``prepare`` (its fingerprint) fix the token streams, data.seq_len cuts them into samples and
train.seed shuffles them. data.weights is compared by :func:`check_prepared_data`, since its
empty default (token shares) depends on the prepared data."""

_TOKENIZER_SETTINGS = ("data.tokenizer_type", "data.vocab_size")


def read_saved_config(path: Path) -> dict[str, Any]:
    """The config step folder ``path`` was saved with, as a TOML dict (not validated, so that a
    config saved by an older version stays readable); CheckpointError when the folder is damaged."""
    verify(path)
    try:
        return tomllib.loads((path / "config.toml").read_text())
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise CheckpointError(f"checkpoint {path}: config.toml is unreadable ({exc})") from None


def _field(config: dict, name: str) -> Any:
    """Field ``section.key`` of a config dict; its default when the dict predates the field."""
    section, key = name.split(".")
    return config.get(section, {}).get(key, getattr(getattr(Config(), section), key))


def _refusal(name: str, old: Any, new: Any, path: Path, consumed: int) -> ConfigError:
    return ConfigError(
        f"{name}: {json.dumps(new)} differs from {json.dumps(old)} in checkpoint {path}, whose data "
        f"position ({consumed:,} samples consumed) has no exact equivalent under the new value; set it "
        f"back to {json.dumps(old)} to resume, or start a new run in another run.dir (--init-from {path} "
        "starts it from these weights)"
    )


def check_data_order(path: Path, cfg: Config) -> None:
    """Refuse to resume ``cfg`` from step folder ``path`` if a field of DATA_ORDER_FIELDS changed.

    Raises ConfigError naming the first changed field, its old and new value and how to proceed;
    CheckpointError when ``path`` is damaged. Reads two small files and writes nothing: the
    trainer calls it before ``prepare``, which would rewrite data.dir for other sources or
    tokenizer settings.
    """
    saved, new = read_saved_config(path), cfg.to_dict()
    consumed = read_train_state(path)["data"]["consumed_samples"]
    same_file = _field(saved, "data.tokenizer") == _field(new, "data.tokenizer") != ""
    for name in DATA_ORDER_FIELDS:
        if same_file and name in _TOKENIZER_SETTINGS:
            continue  # they only configure a tokenizer to train (as in prepare's fingerprint)
        old, value = _field(saved, name), _field(new, name)
        if old != value:
            raise _refusal(name, old, value, path, consumed)


def prepared_data_record(meta: dict) -> dict[str, Any]:
    """What identifies prepared token streams without a pass over the shards (from meta.json):
    the tokenizer's SHA-256 and each dataset's train documents and tokens. Saved in train_state."""
    return {
        "tokenizer_sha256": meta["tokenizer_sha256"],
        "train_documents": [e["documents"]["train"] for e in meta["datasets"]],
        "train_tokens": [e["tokens"]["train"] for e in meta["datasets"]],
    }


def blend_quanta(data_dir: str | Path, weights: list[float]) -> list[int]:
    """The integer blend weights (see :func:`~pretrain.data.blend.quantize_weights`) the sample
    order of ``data_dir``'s train split is built from: equal quanta give the same order, so
    weights [1, 3] and [2, 6] are the same blend. Empty ``weights`` means token shares."""
    return quantize_weights([w for _, w in prepared_datasets(data_dir, "train", weights or None)]).tolist()


def check_prepared_data(path: Path, cfg: Config, meta: dict) -> None:
    """Refuse to resume from step folder ``path`` when the prepared data in cfg.data.dir
    (``meta``, its meta.json) or the blend it gives under data.weights is not the one the
    checkpoint was trained on. data.dir itself may move.

    Raises ConfigError (one line: the field, old and new values, how to proceed); CheckpointError
    when ``path`` is damaged. Checkpoints written before the data record was saved are checked
    on the weights only.
    """
    state = read_train_state(path)
    consumed = state["data"]["consumed_samples"]
    saved, now = state.get("prepared_data"), prepared_data_record(meta)
    if saved is not None and saved != now:
        key = next(k for k in now if saved.get(k) != now[k])
        raise ConfigError(
            f"data.dir: the prepared data in {cfg.data.dir} is not the data checkpoint {path} was "
            f"trained on ({key} {saved.get(key)} -> {now[key]}), so its data position ({consumed:,} "
            "samples consumed) would name other tokens; prepare the original sources with the original "
            "tokenizer to resume, or start a new run in another run.dir (--init-from starts it from these weights)"
        )
    old = _field(read_saved_config(path), "data.weights")
    if blend_quanta(cfg.data.dir, old) != blend_quanta(cfg.data.dir, cfg.data.weights):
        raise _refusal("data.weights", old, cfg.data.weights, path, consumed)


def resolve_checkpoint(path: Path) -> Path:
    """A step folder from a step folder, a checkpoint folder or a run folder (newest step)."""
    if (path / "manifest.json").is_file():
        return path
    for root in (path / "checkpoints", path):
        steps = complete_steps(root)
        if steps:
            return steps[0]
    raise CheckpointError(f"checkpoint {path}: no complete checkpoint found there")


def load_for_inference(path: Path, device: torch.device | str = "cpu"):
    """(config, model in eval mode, tokenizer path) of the checkpoint at or under ``path``."""
    from pretrain.config import load_config
    from pretrain.models import build_model

    step = resolve_checkpoint(Path(path))
    cfg = load_config(step / "config.toml")
    model = build_model(cfg.model)
    state = {"model": model.state_dict()}
    _load_state(step, state)
    model.load_state_dict(state["model"])
    return cfg, model.to(device).eval(), step / "tokenizer.model"
