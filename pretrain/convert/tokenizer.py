"""Our sentencepiece model as Hugging Face tokenizer files (``tokenizer.json`` +
``tokenizer_config.json``), encoding exactly as sentencepiece does.

Our documents are stored each ending with EOS and no BOS (pretrain/data/prepare.py), so a
document starts right after an EOS, and `pretrain generate` prepends one EOS to the prompt.
The exported tokenizer does the same: its BOS *is* the EOS piece, added once in front
(``bos_token_id == eos_token_id``, as GPT-2 does), never the unused ``<s>`` (id 1) that the
model has not seen. One known difference: the literal text ``</s>`` encodes as the special
token in transformers and as ordinary characters in sentencepiece.
"""

from __future__ import annotations

from pathlib import Path

from pretrain.convert.families import ConvertError


def hf_tokenizer(spm_path: Path):
    """A transformers fast tokenizer (``PreTrainedTokenizerFast``) equivalent to the
    sentencepiece model at ``spm_path`` (BPE or unigram), adding the EOS piece as its BOS.
    Raises ConvertError when the file is missing or not a sentencepiece model."""
    from sentencepiece import sentencepiece_model_pb2
    from tokenizers import processors
    from transformers import PreTrainedTokenizerFast
    from transformers.convert_slow_tokenizer import SpmConverter

    if not Path(spm_path).is_file():
        raise ConvertError(f"tokenizer {spm_path}: the sentencepiece model is missing")
    proto = sentencepiece_model_pb2.ModelProto()
    try:
        proto.ParseFromString(Path(spm_path).read_bytes())
    except Exception as exc:  # protobuf's DecodeError has no stable import path
        raise ConvertError(f"tokenizer {spm_path}: not a sentencepiece model ({exc})") from None
    pieces = proto.pieces
    spec = proto.trainer_spec
    if spec.model_type == 2:  # BPE: the converter ranks merges by piece score
        vocab = {p.piece: i for i, p in enumerate(pieces)}
    elif spec.model_type == 1:  # unigram
        vocab = [(p.piece, p.score) for p in pieces]
    else:
        raise ConvertError(f"tokenizer {spm_path}: sentencepiece model type {spec.model_type} is not BPE or unigram")
    if spec.eos_id < 0:
        raise ConvertError(f"tokenizer {spm_path}: has no end-of-sequence piece")
    # legacy=True: the dummy prefix goes in front of the text even when it starts with a space,
    # as sentencepiece does (" a" -> "▁▁a")
    tok = SpmConverter.build_tokenizer_from_spm_proto(proto, vocab, legacy=True)
    eos = pieces[spec.eos_id].piece
    tok.post_processor = processors.TemplateProcessing(
        single=f"{eos} $A", pair=f"{eos} $A {eos} $B", special_tokens=[(eos, spec.eos_id)]
    )
    unk = pieces[spec.unk_id].piece if spec.unk_id >= 0 else None
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=eos, eos_token=eos, unk_token=unk)
