"""Whether a checkpoint can be resumed under the config given now.

Resuming under a changed config: the data position (``consumed_samples`` of one global sample
order, see :class:`~pretrain.data.loader.PackedLoader`) stays exact under any global batch size,
micro-batch size or parallel layout, and is unaffected by the optimizer, schedule, logging,
evaluation and checkpoint settings. Everything that defines the order itself (the prepared token
streams, data.seq_len, data.weights, train.seed) must be unchanged: a sample index of a 32-token
order names other tokens in a 64-token one, and a mid-epoch position in a shuffled order has no
exact equivalent in another. :func:`check_data_order` and :func:`check_prepared_data` refuse such
a resume with a one-line :class:`~pretrain.config.ConfigError` before anything is written.

The model must be the same too: :func:`check_model_fits` compares the checkpoint's parameter
names and shapes with the model built from the config, so a changed architecture stops the run
with one line naming the parameters and config fields that differ, instead of being taken for a
damaged checkpoint (skipped, and the run restarted from step 0 over the old checkpoints).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint.state_dict import get_model_state_dict

from pretrain.config import Config, ConfigError
from pretrain.data.blend import quantize_weights
from pretrain.data.meta import prepared_datasets
from pretrain.train.checkpoint import CheckpointError, read_saved_config, read_train_state


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


def _flat(tree: dict, prefix: str = "") -> dict[str, Any]:
    out = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            out.update(_flat(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def check_model_fits(path: Path, model: nn.Module, cfg: Config | None = None) -> None:
    """Raise ConfigError unless the model parameters saved in step folder ``path`` have exactly
    the names and (global) shapes of ``model``'s (any parallel layout). The one-line message
    names up to three differing parameters and, given the run's ``cfg``, the model config fields
    that differ from the checkpoint's. CheckpointError when the folder's metadata is unreadable.
    """
    try:
        meta = dcp.FileSystemReader(str(path)).read_metadata().state_dict_metadata
    except Exception as exc:  # a damaged .metadata: reported and skipped like other damage
        raise CheckpointError(f"checkpoint {path}: unreadable metadata ({type(exc).__name__})") from None
    saved = {k[len("model.") :]: tuple(v.size) for k, v in meta.items() if k.startswith("model.") and hasattr(v, "size")}
    here = {k: tuple(v.shape) for k, v in get_model_state_dict(model).items()}
    problems = [f"{k} only in the checkpoint" for k in sorted(saved.keys() - here.keys())]
    problems += [f"{k} not in the checkpoint" for k in sorted(here.keys() - saved.keys())]
    problems += [f"{k} {list(saved[k])} there, {list(here[k])} here" for k in sorted(saved.keys() & here.keys())
                 if saved[k] != here[k]]
    if not problems:
        return
    fields = ""
    if cfg is not None:
        old, new = _flat(read_saved_config(path).get("model", {}), "model."), _flat(cfg.to_dict()["model"], "model.")
        diffs = [f"{k} {json.dumps(old.get(k))} -> {json.dumps(new[k])}" for k in new if old.get(k) != new[k]]
        fields = f"; model config changed: {', '.join(diffs[:3])}" if diffs else ""
    more = f" and {len(problems) - 3} more" if len(problems) > 3 else ""
    raise ConfigError(
        f"model: checkpoint {path} holds another model ({'; '.join(problems[:3])}{more}){fields}; "
        "use the model settings it was saved with, or start a new run in another run.dir"
    )


SCHEDULE_FIELDS = ("train.max_steps", "optim.lr", "optim.min_lr_ratio", "optim.schedule", "optim.warmup_steps",
                   "optim.decay_fraction")


def schedule_change(path: Path, cfg: Config, step: int) -> str | None:
    """A one-line note when ``cfg`` resumes step folder ``path`` under another learning-rate
    schedule (a longer run, another peak, ...): the fields that changed and the rate of the next
    step, ``step``, under the saved and the new schedule; None when the schedule is the same."""
    from pretrain.config import OptimConfig
    from pretrain.train.optim import lr_at

    saved, new = read_saved_config(path), cfg.to_dict()
    changed = [n for n in SCHEDULE_FIELDS if _field(saved, n) != _field(new, n)]
    if not changed:
        return None
    old_optim = OptimConfig(**{k: _field(saved, f"optim.{k}") for k in OptimConfig.__dataclass_fields__})
    old_lr = lr_at(step, old_optim, _field(saved, "train.max_steps"))
    new_lr = lr_at(step, cfg.optim, cfg.train.max_steps)
    what = ", ".join(f"{n} {json.dumps(_field(saved, n))} -> {json.dumps(_field(new, n))}" for n in changed)
    return f"learning-rate schedule changed on resume ({what}): step {step + 1} trains at {new_lr:.3g}, was {old_lr:.3g}"
