"""`pretrain convert CHECKPOINT --to hf OUT`: a DCP checkpoint -> a Hugging Face folder that
loads with the native transformers class of its family, or, for the families without one (or
with ``remote_code``), with our own model code bundled into the folder (pretrain/convert/remote.py;
``trust_remote_code=True``).

The folder: ``config.json`` (standard names), ``generation_config.json``, ``model.safetensors``
(or shards plus ``model.safetensors.index.json`` above ``max_shard_size``; a remote-code
export keeps our parameter names), the remote code's ``*.py`` files, ``tokenizer.json`` +
``tokenizer_config.json`` (see pretrain/convert/tokenizer.py) and our ``tokenizer.model``, so
`pretrain convert OUT --from hf` can import it back; a run with a Hugging Face tokenizer (one
imported from ``tokenizer.json``) gets its ``tokenizer.json`` + ``tokenizer_config.json`` as
they were. Written atomically (pretrain/convert/folder.py).
"""

from __future__ import annotations

import shutil
import os
from pathlib import Path

import torch

from pretrain.convert.families import HF_CLASSES, ConvertError, hf_config_dict, native_family
from pretrain.convert.folder import atomic_folder
from pretrain.convert.tokenizer import hf_tokenizer
from pretrain.convert.weights import to_hf
from pretrain.data import Tokenizer
from pretrain.data.tokenizer import copy_tokenizer, is_hf_tokenizer


def hf_classes(family: str):
    """(config class, model class) of ``family`` in transformers."""
    import transformers

    model_cls = getattr(transformers, HF_CLASSES[family])
    return model_cls.config_class, model_cls


def build_hf_model(family: str, cfg, state: dict[str, torch.Tensor], eos_id: int, max_positions: int):
    """The transformers model of ``family`` holding our ``state`` (a ``HybridLM`` state_dict of
    ``cfg``, a ModelConfig), in eval mode, in the weights' dtype."""
    from transformers import GenerationConfig

    config_cls, model_cls = hf_classes(family)
    config = config_cls(**hf_config_dict(family, cfg, eos_id, max_positions))
    model = model_cls(config)
    missing, unexpected = model.load_state_dict(to_hf(family, cfg, state), strict=False)
    if missing or unexpected:
        raise ConvertError(f"{HF_CLASSES[family]}: the mapped weights miss {missing[:3]} and add {unexpected[:3]}")
    model.generation_config = GenerationConfig(bos_token_id=eos_id, eos_token_id=eos_id, pad_token_id=eos_id)
    return model.eval()


def check_shard_size(size: str | int) -> int:
    """Bytes of a shard size like 5GB, 500MB or 2GiB (transformers' units); ConvertError naming
    --max-shard-size otherwise."""
    from transformers.utils.hub import convert_file_size_to_int

    try:
        value = convert_file_size_to_int(size)
    except (ValueError, TypeError):
        value = 0
    if not isinstance(value, int) or value <= 0:
        raise ConvertError(f"--max-shard-size: {size!r} is not a size such as 5GB, 500MB or 2GiB")
    return value


def check_output_folder(out: Path) -> None:
    """ConvertError when ``out`` exists or its parent cannot hold a new folder (checked before
    the checkpoint is read)."""
    if out.exists():
        raise ConvertError(f"{out}: already exists; choose a new output folder")
    parent = out.parent
    while not parent.exists() and parent != parent.parent:
        parent = parent.parent
    if not parent.is_dir() or not os.access(parent, os.W_OK | os.X_OK):
        raise ConvertError(f"{out}: cannot create it ({parent} is not a writable folder)")


def export_hf(
    checkpoint: Path,
    out: Path,
    max_shard_size: str | int = "5GB",
    native_only: bool = False,
    remote_code: bool = False,
) -> str:
    """Export the checkpoint at or under ``checkpoint`` (a step, checkpoints or run folder of
    any parallel layout, read in this one process) to the Hugging Face folder ``out``.

    Returns the family: a key of :data:`~pretrain.convert.families.HF_CLASSES` for a native
    export, :data:`~pretrain.convert.remote.REMOTE_FAMILY` for a remote-code one (the model's
    family has no native class, or ``remote_code`` asks for it). ``native_only``: refuse
    anything but a native class. Raises ConvertError when ``native_only`` meets a model
    without a native class (or both flags are given), the checkpoint has no tokenizer, ``out``
    exists or the model code cannot be bundled (:class:`~pretrain.convert.remote.BundleError`);
    CheckpointError when the folder is not a usable checkpoint. Nothing is written under
    ``out`` unless the export completes."""
    from pretrain.convert import remote
    from pretrain.train.checkpoint import load_for_inference

    if native_only and remote_code:
        raise ConvertError("--native-only and --remote-code: choose one")
    check_shard_size(max_shard_size)
    check_output_folder(Path(out))
    cfg, model, tok_path = load_for_inference(Path(checkpoint))
    try:
        family = remote.REMOTE_FAMILY if remote_code else native_family(cfg.model)
    except ConvertError:
        if native_only:
            raise
        family = remote.REMOTE_FAMILY
    if Path(out).exists():
        raise ConvertError(f"{out}: already exists; choose a new output folder")
    if not tok_path.is_file():
        raise ConvertError(f"checkpoint {tok_path.parent}: tokenizer.model is missing")
    if is_hf_tokenizer(tok_path):
        tokenizer = None
        eos_id = Tokenizer(tok_path).eos_id
    else:
        tokenizer = hf_tokenizer(tok_path)
        eos_id = tokenizer.eos_token_id
    state = {k: v.detach() for k, v in model.state_dict().items()}
    files = {}
    if family == remote.REMOTE_FAMILY:
        files = remote.bundle()  # before anything is written: a failure leaves no folder
        hf_model = remote.build_remote_model(cfg.model, state, eos_id, cfg.data.seq_len)
    else:
        hf_model = build_hf_model(family, cfg.model, state, eos_id, cfg.data.seq_len)
    with atomic_folder(Path(out)) as tmp:
        hf_model.save_pretrained(tmp, max_shard_size=max_shard_size)
        remote.write_remote_files(tmp, files)
        if tokenizer is None:
            copy_tokenizer(tok_path, tmp)
        else:
            tokenizer.save_pretrained(tmp)
            shutil.copyfile(tok_path, tmp / "tokenizer.model")
    return family
