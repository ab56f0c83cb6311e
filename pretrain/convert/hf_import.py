"""`pretrain convert HF_DIR --from hf OUT`: a Hugging Face checkpoint of a native family
(Llama, Mistral, Mixtral, Mamba, Mamba-2) -> a run folder to continue pretraining from.

``OUT`` holds ``config.toml`` (a config `pretrain train` accepts; ``--set`` overrides given to
the import, e.g. the data sources, are applied to it), the HF folder's tokenizer, which
data.tokenizer names (its sentencepiece ``tokenizer.model`` when it has one, else its
``tokenizer.json`` + ``tokenizer_config.json``, e.g. the byte-level BPE of Mamba or Llama-3)
and ``checkpoints/step-00000000`` (a DCP checkpoint at step 0 with a fresh optimizer and data
position 0), so `pretrain train OUT/config.toml` resumes from it. Written atomically (pretrain/convert/folder.py).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from pretrain.convert.export import hf_classes
from pretrain.convert.families import ConvertError, model_section_from_hf
from pretrain.convert.folder import atomic_folder
from pretrain.data.blend import ORDERS
from pretrain.convert.weights import from_hf


def read_hf_config(hf_dir: Path) -> dict:
    """``config.json`` of a Hugging Face model folder; ConvertError when absent or unreadable."""
    path = Path(hf_dir) / "config.json"
    if not path.is_file():
        raise ConvertError(f"{hf_dir}: not a Hugging Face model folder (config.json is missing)")
    try:
        return json.loads(path.read_text())
    except ValueError as exc:
        raise ConvertError(f"{path}: unreadable ({exc})") from None


def imported_config(hf_dir: Path, out: Path, overrides: list[str] | None = None):
    """(family, our Config) for the HF model in ``hf_dir`` written to ``out``: its model
    section, data.tokenizer = ``out/`` + the name of ``hf_dir``'s tokenizer file
    (:func:`~pretrain.data.tokenizer.tokenizer_file`), run.dir = ``out``, then ``overrides``."""
    from pretrain.config import config_from_dict
    from pretrain.data.tokenizer import tokenizer_file

    family, model = model_section_from_hf(read_hf_config(hf_dir))
    out = Path(out).resolve()
    data = {"tokenizer": str(out / tokenizer_file(hf_dir).name), "dir": str(out / "data")}
    return family, config_from_dict({"run": {"name": out.name, "dir": str(out)}, "model": model, "data": data}, overrides)


def import_hf(hf_dir: Path, out: Path, overrides: list[str] | None = None) -> str:
    """Import the Hugging Face model folder ``hf_dir`` into the run folder ``out`` (see the
    module docstring); returns its family. Raises ConvertError for an unsupported model type or
    feature, a folder without ``config.json`` or without a ``tokenizer.model`` or
    ``tokenizer.json``, or an existing ``out``; DataError for an unreadable tokenizer or one
    without an EOS; ConfigError for a bad override. Writes nothing under ``out`` unless
    the import completes."""
    from pretrain.data import Tokenizer
    from pretrain.data.tokenizer import copy_tokenizer, tokenizer_file
    from pretrain.models import build_model
    from pretrain.train.checkpoint import save_checkpoint
    from pretrain.train.optim import build_optimizer

    hf_dir, out = Path(hf_dir), Path(out)
    family, cfg = imported_config(hf_dir, out, overrides)
    tok_path = tokenizer_file(hf_dir)
    if not tok_path.is_file():
        raise ConvertError(f"{hf_dir}: no tokenizer.model or tokenizer.json, which our data pipeline needs")
    if Tokenizer(tok_path).vocab_size > cfg.model.vocab_size:
        raise ConvertError(f"{tok_path}: the tokenizer has more pieces than the model's vocab_size {cfg.model.vocab_size}")
    if out.exists():
        raise ConvertError(f"{out}: already exists; choose a new output folder")
    _, model_cls = hf_classes(family)
    hf_model, info = model_cls.from_pretrained(hf_dir, dtype=torch.float32, output_loading_info=True)
    if info["missing_keys"]:  # transformers would fill them with a fresh random init
        raise ConvertError(f"{hf_dir}: the weights miss {sorted(info['missing_keys'])[:3]} that config.json needs")
    with torch.device("meta"):
        model = build_model(cfg.model)
    model.to_empty(device="cpu")
    try:
        model.load_state_dict(from_hf(family, cfg.model, hf_model.state_dict()), strict=True)
    except RuntimeError as exc:
        raise ConvertError(f"{hf_dir}: weights do not fit config.json ({str(exc).splitlines()[0]})") from None
    optimizer = build_optimizer(model, cfg.optim, torch.device("cpu"))
    with atomic_folder(out) as tmp:
        copy_tokenizer(tok_path, tmp)
        (tmp / "config.toml").write_text(cfg.to_toml())
        train_state = {"data": {"consumed_samples": 0, "order": ORDERS[0]}, "imported_from": str(hf_dir.resolve())}
        save_checkpoint(tmp / "checkpoints", 0, model, optimizer, train_state, cfg.to_toml(), tok_path, keep_last=1)
    return family
