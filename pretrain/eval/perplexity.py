"""Perplexity and bits per byte of a checkpoint on the validation split of its prepared data.

Bits per byte (bpb) is the tokenizer-independent form of the same loss (as in The Pile, Gao et al.
2020): the total cross-entropy of the predicted tokens, in bits, divided by the UTF-8
bytes of the text those tokens decode to, ``sum(nats) / ln 2 / sum(bytes)``. Every predicted
token counts in the numerator, the end-of-document tokens too (they carry where a document
ends, and add no bytes).

Bytes per token come from the sentencepiece pieces (:func:`piece_bytes`), so that they add up,
document by document, to the bytes of ``Tokenizer.decode`` of its tokens:

- a text piece: its UTF-8 bytes with the whitespace mark ``▁`` (U+2581, 3 bytes) as one space;
- a byte-fallback piece ``<0xAB>``: 1 byte;
- unk: the bytes of the mark sentencepiece decodes it to (`` ⁇ ``, 5 bytes): the text the model
  saw there is unknown (only tokenizers without byte fallback, below 512 pieces, produce it);
- control pieces (BOS, EOS): 0 bytes;
- at a document start (the first token, and each token after an EOS) one byte less when the
  piece begins with ``▁``: that space is the dummy prefix the encoder added and the decoder drops.

For a Hugging Face ``tokenizer.json`` (:func:`hf_token_bytes`) the bytes of a token come from
decoding it: with a byte-level decoder (GPT-2, GPT-NeoX/Mamba, Llama-3) each character of the
token string stands for one byte, which is exact even for a token holding part of a UTF-8
character; with another decoder, the UTF-8 bytes of ``decode([id])``. Special tokens (EOS
among them) add 0 bytes, and no token loses a byte at a document start.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from pretrain.data import read_meta, validation_batches
from pretrain.data.errors import DataError
from pretrain.data.tokenizer import is_hf_tokenizer, tokenizer_sha256
from pretrain.train.checkpoint import load_for_inference

_SPACE = "\u2581"  # sentencepiece's whitespace mark


def piece_bytes(tokenizer_path: Path) -> tuple[np.ndarray, np.ndarray]:
    """Per token id of the sentencepiece model at ``tokenizer_path``: the UTF-8 bytes it adds to
    decoded text mid-document (int64 ``[V]``) and whether it loses one of them at a document
    start (bool ``[V]``, pieces starting with ``▁`` when the model adds a dummy prefix).

    Raises DataError for a missing or unreadable model, or one that puts the whitespace mark
    after words (``treat_whitespace_as_suffix``), whose decoding the rules above do not cover."""
    import sentencepiece as spm
    from sentencepiece import sentencepiece_model_pb2

    path = Path(tokenizer_path)
    if not path.is_file():
        raise DataError(f"tokenizer {path}: no such file")
    proto = sentencepiece_model_pb2.ModelProto()
    try:
        proto.ParseFromString(path.read_bytes())
    except Exception as exc:  # protobuf's DecodeError has no stable import path
        raise DataError(f"tokenizer {path}: not a sentencepiece model ({exc})") from None
    if proto.trainer_spec.treat_whitespace_as_suffix:
        raise DataError(f"tokenizer {path}: whitespace-as-suffix models are not supported by bits per byte")
    sp = spm.SentencePieceProcessor(model_proto=proto.SerializeToString())
    n = sp.vocab_size()
    nbytes = np.zeros(n, dtype=np.int64)
    prefixed = np.zeros(n, dtype=bool)
    for i in range(n):
        if sp.is_control(i):
            continue
        if sp.is_unknown(i):
            nbytes[i] = len(sp.decode([i]).encode("utf-8"))
        elif sp.is_byte(i):
            nbytes[i] = 1
        else:
            piece = sp.id_to_piece(i)
            nbytes[i] = len(piece.replace(_SPACE, " ").encode("utf-8"))
            prefixed[i] = piece.startswith(_SPACE)
    prefixed &= bool(proto.normalizer_spec.add_dummy_prefix)
    return nbytes, prefixed


def hf_token_bytes(tokenizer_path: Path) -> tuple[np.ndarray, np.ndarray]:
    """Per token id of the Hugging Face ``tokenizer.json`` at ``tokenizer_path``: the UTF-8
    bytes it adds to decoded text (int64 ``[V]``, see the module docstring) and whether it loses
    one at a document start (bool ``[V]``, all False). Raises DataError for a missing or
    unreadable file."""
    import json

    from tokenizers import Tokenizer as _Tokenizers

    path = Path(tokenizer_path)
    if not path.is_file():
        raise DataError(f"tokenizer {path}: no such file")
    try:
        tok = _Tokenizers.from_file(str(path))
        spec = json.loads(path.read_text(encoding="utf-8"))
    except Exception as exc:  # the Rust side raises a plain Exception
        raise DataError(f"tokenizer {path}: not a Hugging Face tokenizer.json ({exc})") from None
    decoder = spec.get("decoder") or {}
    byte_level = decoder.get("type") == "ByteLevel" or any(
        d.get("type") == "ByteLevel" for d in decoder.get("decoders", []) if isinstance(d, dict)
    )
    specials = {t["id"] for t in spec.get("added_tokens", []) if t.get("special")}
    n = tok.get_vocab_size(with_added_tokens=True)
    nbytes = np.zeros(n, dtype=np.int64)
    added = {t["id"] for t in spec.get("added_tokens", [])}
    for i in range(n):
        if i in specials:
            continue
        token = tok.id_to_token(i)
        if token is None:
            continue
        if byte_level and i not in added:  # a byte-level token string has one character per byte
            nbytes[i] = len(token)
        else:
            nbytes[i] = len(tok.decode([i], skip_special_tokens=False).encode("utf-8"))
    return nbytes, np.zeros(n, dtype=bool)


def label_bytes(
    input_ids: torch.Tensor, labels: torch.Tensor, nbytes: np.ndarray, prefixed: np.ndarray, eos_id: int
) -> int:
    """UTF-8 bytes of the text that ``labels [B, T]`` (the next tokens of ``input_ids [B, T]``,
    int64; -100 ignored) decode to, by :func:`piece_bytes`'s tables: a label starts a document
    when its input token is an EOS."""
    keep = labels.cpu().numpy() != -100
    lab = labels.cpu().numpy()[keep]
    starts = (input_ids.cpu().numpy() == eos_id)[keep]
    return int(nbytes[lab].sum() - (prefixed[lab] & starts).sum())


@torch.no_grad()
def perplexity(checkpoint: Path, samples: int | None = None, device: str = "cpu") -> dict[str, Any]:
    """Validation scores of the checkpoint at or under ``checkpoint`` on the first ``samples``
    sequences (default: the config's train.eval_samples) of the fixed validation order, the
    sequences the trainer's validation scores (:func:`pretrain.data.validation_batches`).

    Returns ``val_loss`` (mean nats/token, fp32 logits; the trainer's val_loss on the same
    checkpoint up to the fused loss's rounding), ``val_ppl`` (its exponent),
    ``bits_per_byte``, ``tokens`` and ``bytes`` (the predicted tokens and their decoded UTF-8
    bytes), ``unigram_entropy`` (the prepared data's baseline, nats/token). Raises
    CheckpointError / DataError for an unusable checkpoint or data directory."""
    cfg, model, tok_path = load_for_inference(checkpoint, device)
    n = samples or cfg.train.eval_samples
    meta = read_meta(cfg.data.dir)
    if tok_path.is_file() and tokenizer_sha256(tok_path) != meta["tokenizer_sha256"]:
        raise DataError(f"data dir {cfg.data.dir}: prepared with another tokenizer than checkpoint {tok_path.parent}")
    tok_file = Path(cfg.data.dir) / meta["tokenizer"]
    nbytes, prefixed = hf_token_bytes(tok_file) if is_hf_tokenizer(tok_file) else piece_bytes(tok_file)
    eos_id = meta["eos_id"]
    batches = validation_batches(cfg.data.dir, cfg.data.seq_len, n, cfg.train.micro_batch_size, 0, 1)
    nats, tokens, text_bytes = 0.0, 0, 0
    for batch in batches:
        ids, pos, labels = (batch[k].to(device) for k in ("input_ids", "position_ids", "labels"))
        # one sequence per forward: fp32 logits [T, V] stay small at any micro-batch size
        for row in range(ids.shape[0]):
            if (labels[row] == -100).all():  # padding of the last micro-batch: no token to score
                continue
            logits = model(ids[row : row + 1], position_ids=pos[row : row + 1])[0]
            nats += F.cross_entropy(logits.float(), labels[row], reduction="sum").item()  # -100 ignored
        tokens += int((labels != -100).sum())
        text_bytes += label_bytes(ids, labels, nbytes, prefixed, eos_id)
    loss = nats / max(tokens, 1)
    return {
        "val_loss": loss,
        "val_ppl": math.exp(min(loss, 50.0)),
        "bits_per_byte": nats / math.log(2) / max(text_bytes, 1),
        "tokens": tokens,
        "bytes": text_bytes,
        "unigram_entropy": meta.get("unigram_entropy", float("nan")),
    }
