"""Checkpoint conversion: DCP <-> Hugging Face folders.

:func:`export_hf` writes a native transformers folder (Llama, Mistral, Mixtral, DiffLlama,
Mamba, Mamba-2; pretrain/convert/families.py decides which applies), or for every other family
(Samba, SambaY/YOCO/GMU, GLA, Titans, RMoE, mixes; or on request) a folder with our model code
bundled from the trainer's own source (pretrain/convert/remote.py, loaded with
``trust_remote_code=True``, needing only torch and transformers); :func:`import_hf` turns a
native folder into a run folder that `pretrain train` resumes from.
"""

from pretrain.convert.export import build_hf_model, export_hf
from pretrain.convert.families import HF_CLASSES, IMPORTABLE, ConvertError, native_family
from pretrain.convert.hf_import import import_hf

__all__ = ["HF_CLASSES", "IMPORTABLE", "ConvertError", "build_hf_model", "export_hf", "import_hf", "native_family"]
