"""Checkpoint conversion: DCP <-> Hugging Face folders.

:func:`export_hf` writes a native transformers folder (Llama, Mistral, Mixtral, DiffLlama,
Mamba, Mamba-2; pretrain/convert/families.py decides which applies); :func:`import_hf` turns
such a folder into a run folder that `pretrain train` resumes from.
"""

from pretrain.convert.export import build_hf_model, export_hf
from pretrain.convert.families import HF_CLASSES, IMPORTABLE, ConvertError, native_family
from pretrain.convert.hf_import import import_hf

__all__ = ["HF_CLASSES", "IMPORTABLE", "ConvertError", "build_hf_model", "export_hf", "import_hf", "native_family"]
