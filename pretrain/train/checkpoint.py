"""Checkpoints: one DCP directory per saved step, written atomically.

Layout of ``<checkpoint dir>/step-00000100/``::

    .metadata, *.distcp   model + optimizer (DCP; any parallel layout can load them)
    rng/rank<R>.pt        RNG states of each rank (torch, CUDA, numpy, python)
    train_state.json      step, data position, run bookkeeping
    config.toml           the resolved config of the run
    tokenizer.model       the tokenizer, so the folder alone can generate text (or
                          tokenizer.json + tokenizer_config.json, see pretrain/data/tokenizer.py)
    manifest.json         every file's size; written last

A step is first written to ``step-00000100.tmp`` and renamed when complete, so a folder
without the suffix is complete unless its files were damaged later; the manifest catches
truncation, a failing load catches the rest, and either way the step is reported and the
next older one is tried.

A write that fails (a full disk, an unwritable folder) on any rank fails on all of them alike
(:class:`CheckpointWriteError`, one line): the partial ``.tmp`` folder is removed, the complete
ones are left as they were. With ``checkpoint.async_save`` DCP writes in a background thread
(its own gloo group) and the folder is completed only once that write has finished.
"""

from __future__ import annotations

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

from pretrain.config import ConfigError
from pretrain.data.tokenizer import copy_tokenizer, tokenizer_file
from pretrain.data.tokenizer import tokenizer_sha256 as _tokenizer_sha256

PREFIX = "step-"
TMP_SUFFIX = ".tmp"


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be used; the message names the folder and the reason."""


class CheckpointWriteError(CheckpointError):
    """A checkpoint could not be written (full disk, no permission); the older ones are intact."""


def step_dir(root: Path, step: int) -> Path:
    return root / f"{PREFIX}{step:08d}"


def _rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


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


def _one_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def _agree(phase: Callable[[], None], final: Path) -> None:
    """Run ``phase`` on this rank, then raise the same CheckpointWriteError on every rank when it
    failed on any (collective: no rank is left waiting in a later collective of the save)."""
    error = None
    try:
        phase()
    except (OSError, RuntimeError, CheckpointException) as exc:  # DCP's own is a BaseException
        error = _one_line(exc)
    if dist.is_initialized():
        errors: list[str | None] = [None] * dist.get_world_size()
        dist.all_gather_object(errors, error)
        error = next((e for e in errors if e), None)
    if error is not None:
        if _rank() == 0:
            shutil.rmtree(final.with_name(final.name + TMP_SUFFIX), ignore_errors=True)
        raise CheckpointWriteError(
            f"checkpoint {final}: not written ({error}); the older checkpoints in {final.parent} are intact; "
            "free space or fix the folder's permissions, then resume with --resume auto"
        )


class Checkpointer:
    """Writes checkpoints (:meth:`save`), synchronously or, with ``async_save``, with DCP's
    async_save (under torch.distributed; one process writes synchronously, as DCP's background
    write warns without a process group): the model and optimizer state are staged in host memory
    before :meth:`save` returns, written in the background, and the folder completed by the next
    :meth:`save` or :meth:`finish`. All methods are collective."""

    def __init__(self, async_save: bool = False) -> None:
        self.async_save = async_save
        self._pending: tuple[Any, Callable[[], None], Path] | None = None
        self._group = None

    def save(
        self,
        root: Path,
        step: int,
        model: nn.Module,
        optimizer: torch.optim.Optimizer,
        train_state: dict[str, Any],
        config_toml: str,
        tokenizer_path: Path | None,
        keep_last: int,
    ) -> Path:
        """Write step ``step`` atomically and prune all but the newest ``keep_last``; raises
        CheckpointWriteError (on every rank) when it cannot be written."""
        self.finish()
        final = step_dir(root, step)
        tmp = final.with_name(final.name + TMP_SUFFIX)

        def start() -> None:
            if _rank() == 0:
                root.mkdir(parents=True, exist_ok=True)
                shutil.rmtree(tmp, ignore_errors=True)
                (tmp / "rng").mkdir(parents=True)

        _agree(start, final)
        model_sd, optim_sd = get_state_dict(model, optimizer)
        state = {"model": model_sd, "optim": optim_sd}
        complete = lambda: _complete(root, final, step, train_state, config_toml, tokenizer_path, keep_last)  # noqa: E731
        if not (self.async_save and dist.is_initialized()):
            _agree(lambda: (_dcp("save", state, tmp), _save_rng(tmp)), final)
            _agree(complete, final)
            return final
        future = None

        def launch() -> None:
            nonlocal future
            _save_rng(tmp)
            future = dcp.async_save(state, checkpoint_id=str(tmp), process_group=self._async_group())

        _agree(launch, final)
        self._pending = (future, complete, final)
        return final

    def _async_group(self):
        # the background thread's collectives must not interleave with the training's on one group
        if self._group is None and dist.is_initialized():
            self._group = dist.new_group(backend="gloo")
        return self._group

    def finish(self) -> None:
        """Wait for a pending asynchronous write and complete its folder (no-op without one)."""
        if self._pending is None:
            return
        future, complete, final = self._pending
        self._pending = None
        _agree(future.result, final)
        _agree(complete, final)


def _save_rng(tmp: Path) -> None:
    torch.save(rng_state(), tmp / "rng" / f"rank{_rank()}.pt")


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
    """Write step ``step`` atomically and prune all but the newest ``keep_last``. Collective;
    CheckpointWriteError when it cannot be written (see :class:`Checkpointer`)."""
    return Checkpointer().save(root, step, model, optimizer, train_state, config_toml, tokenizer_path, keep_last)


def _complete(
    root: Path, final: Path, step: int, train_state: dict[str, Any], config_toml: str,
    tokenizer_path: Path | None, keep_last: int,
) -> None:
    """Rank 0 writes the bookkeeping files and the manifest into the written ``.tmp`` folder,
    renames it to ``final`` and prunes; the other ranks do nothing."""
    if _rank() != 0:
        return
    tmp = final.with_name(final.name + TMP_SUFFIX)
    _write_file(tmp / "train_state.json", json.dumps({"step": step, **train_state}, indent=1).encode())
    _write_file(tmp / "config.toml", config_toml.encode())
    if tokenizer_path is not None:
        copy_tokenizer(tokenizer_path, tmp)
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
    """train_state.json of step folder ``path``; CheckpointError when it is not valid JSON or
    not an object with an integer ``step`` >= 0."""
    try:
        state = json.loads((path / "train_state.json").read_text())
    except (ValueError, OSError) as exc:
        raise CheckpointError(f"checkpoint {path}: train_state.json is unreadable ({exc})") from None
    step = state.get("step") if isinstance(state, dict) else None
    if not isinstance(step, int) or isinstance(step, bool) or step < 0:
        raise CheckpointError(f"checkpoint {path}: train_state.json has no integer step >= 0 (got {step!r})")
    return state


def _reraise_interrupt(exc: BaseException) -> None:
    """DCP wraps a Ctrl-C during a read into a CheckpointException: raise it as the
    KeyboardInterrupt it was, so the user sees 'interrupted', not a damaged checkpoint."""
    failures = exc.failures.values() if isinstance(exc, CheckpointException) else ()
    if any(isinstance(failure[0], KeyboardInterrupt) for failure in failures):
        raise KeyboardInterrupt from None


def _load_state(path: Path, state: dict) -> None:
    """dcp.load into ``state`` in place, any failure as a one-line CheckpointError."""
    verify(path)
    try:
        _dcp("load", state, path)
    except (Exception, CheckpointException) as exc:  # DCP's own exception is a BaseException
        _reraise_interrupt(exc)
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise CheckpointError(f"checkpoint {path}: cannot be loaded ({first})") from None


def load_checkpoint(path: Path, model: nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    """Load model and optimizer state and this rank's RNG from ``path``; returns train_state."""
    model_sd, optim_sd = get_state_dict(model, optimizer)
    state = {"model": model_sd, "optim": optim_sd}
    # A group's parameter names are one saved value per group index, so under pipeline
    # parallelism the file keeps one rank's list; this rank's own names pair its parameters with
    # the loaded moments and hyperparameters (else its groups lose them: KeyError 'betas').
    own_names = [group["params"] for group in optim_sd["param_groups"]]
    _load_state(path, state)
    for group, names in zip(state["optim"]["param_groups"], own_names):
        group["params"] = names
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
    saved = _tokenizer_sha256(tokenizer_file(step))
    if saved != tokenizer_sha256:
        raise ConfigError(
            f"data.tokenizer: the run's tokenizer is not the one checkpoint {step} was trained with, "
            "so its embeddings would name other tokens; "
            f"prepare the data with that checkpoint's {tokenizer_file(step).name}"
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


SAVED_CONFIG_DEFAULTS = {("model", "titans", "mac_output"): "none"}
"""Fields added after checkpoints had been written whose new default would change the model they
hold: a saved config (which lists every field of its day) without the field meant this value."""


def read_saved_config(path: Path) -> dict[str, Any]:
    """The config step folder ``path`` was saved with, as a TOML dict (not validated, so that a
    config saved by an older version stays readable), with :data:`SAVED_CONFIG_DEFAULTS` filled
    in where it predates a field; CheckpointError when the folder is damaged."""
    verify(path)
    try:
        saved = tomllib.loads((path / "config.toml").read_text())
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise CheckpointError(f"checkpoint {path}: config.toml is unreadable ({exc})") from None
    for (*sections, key), value in SAVED_CONFIG_DEFAULTS.items():
        node = saved
        for name in sections:
            node = node.get(name) if isinstance(node, dict) else None
        if isinstance(node, dict):
            node.setdefault(key, value)
    return saved


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
    from pretrain.config import config_from_dict
    from pretrain.models import build_model

    step = resolve_checkpoint(Path(path))
    try:
        cfg = config_from_dict(read_saved_config(step))
    except ConfigError as exc:
        raise CheckpointError(f"checkpoint {step}: its config.toml is not valid ({exc})") from None
    model = build_model(cfg.model)
    from pretrain.train.resume_checks import check_model_fits  # it builds on this module

    check_model_fits(step, model)
    state = {"model": model.state_dict()}
    _load_state(step, state)
    model.load_state_dict(state["model"])
    return cfg, model.to(device).eval(), tokenizer_file(step)
