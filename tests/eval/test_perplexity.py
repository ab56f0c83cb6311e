"""`pretrain eval`'s perplexity and bits per byte against an independent computation: the
validation tokens decoded by sentencepiece and counted in bytes, and the per-token losses of a
plain forward (fp32 logits, log-softmax in float64)."""

from __future__ import annotations

import json
import math

import pytest
import torch

from pretrain.cli import main
from pretrain.data import Tokenizer, validation_batches
from pretrain.eval import results_files
from pretrain.eval.perplexity import label_bytes, perplexity, piece_bytes
from pretrain.train.checkpoint import resolve_checkpoint
from tests.eval.conftest import LLAMA, save_checkpoint_on

pytestmark = pytest.mark.usefixtures("one_thread")


def decoded_bytes(tok: Tokenizer, sample: list[int]) -> int:
    """UTF-8 bytes of the text of ``sample[1:]`` (the labels of a sample whose first token is
    its first input): each stretch between EOS tokens decoded as a whole, less the text of the
    first input token, which decoding the stretch it opens also gives."""
    total, start = 0, 0
    for end in range(len(sample) + 1):
        if end == len(sample) or sample[end] == tok.eos_id:
            if end > start:
                total += len(tok.decode(sample[start:end]).encode("utf-8"))
            start = end + 1
    if sample[0] != tok.eos_id:
        total -= len(tok.decode(sample[:1]).encode("utf-8"))
    return total


def test_bits_per_byte_matches_decoded_text(prepared_dir, tmp_path):
    model, cfg = save_checkpoint_on(prepared_dir, tmp_path / "run", LLAMA, eval_samples=10_000)
    got = perplexity(tmp_path / "run")

    tok = Tokenizer(prepared_dir / "tokenizer.model")
    batches = validation_batches(str(prepared_dir), cfg.data.seq_len, 10_000, cfg.train.micro_batch_size)
    nats, tokens, nbytes, fused = 0.0, 0, 0, []
    with torch.no_grad():
        for b in batches:
            real = (b["labels"] != -100).all(-1)  # the rows that are not padding (all -100)
            assert (real | (b["labels"] == -100).all(-1)).all()
            b = {k: v[real] for k, v in b.items()}
            logits = model(b["input_ids"], position_ids=b["position_ids"])
            logp = torch.log_softmax(logits.double(), dim=-1)
            nats -= logp.gather(-1, b["labels"].unsqueeze(-1)).sum().item()
            tokens += b["labels"].numel()
            mean = model(b["input_ids"], position_ids=b["position_ids"], labels=b["labels"]).item()
            fused += [(mean * b["labels"].numel(), b["labels"].numel())]
            for x, y in zip(b["input_ids"].tolist(), b["labels"].tolist()):
                nbytes += decoded_bytes(tok, [x[0]] + y)

    assert got["tokens"] == tokens > 9000  # the whole validation split
    assert got["bytes"] == nbytes
    assert got["bits_per_byte"] == pytest.approx(nats / math.log(2) / nbytes, rel=1e-6)
    assert got["val_loss"] == pytest.approx(nats / tokens, rel=1e-6)
    # ... and the trainer's validation loss (the fused loss kernel) on the same samples
    assert got["val_loss"] == pytest.approx(sum(s for s, _ in fused) / sum(n for _, n in fused), rel=1e-5)
    assert got["val_ppl"] == pytest.approx(math.exp(nats / tokens), rel=1e-6)


def test_piece_bytes_with_byte_fallback_and_unknown(tmp_path, small_corpus):
    """Byte-fallback pieces, multi-byte characters, unk, runs of spaces and documents opening
    with a space: the tables add up to the decoded bytes of every document."""
    texts = [json.loads(line)["text"] for line in small_corpus.read_text().splitlines()]
    docs = ["Ünïcödé — “quotes” and 漢字 mixed in.", " leading space", "  two\n\nlines  ", "x"]
    for vocab, train_on in ((600, texts + docs[:1]), (256, texts)):  # with and without byte fallback
        tok = Tokenizer.train(train_on, tmp_path / f"sp{vocab}", vocab)
        nbytes, prefixed = piece_bytes(tmp_path / f"sp{vocab}.model")
        stream = [tok.eos_id]
        for d in docs + texts[:3]:
            stream += tok.encode(d) + [tok.eos_id]
        x, y = torch.tensor([stream[:-1]]), torch.tensor([stream[1:]])
        want = sum(len(tok.decode(tok.encode(d)).encode("utf-8")) for d in docs + texts[:3])
        assert label_bytes(x, y, nbytes, prefixed, tok.eos_id) == want, vocab


def test_cli_prints_and_writes_both(prepared_dir, tmp_path, capsys):
    save_checkpoint_on(prepared_dir, tmp_path / "run", LLAMA, eval_samples=8)
    assert main(["eval", "--checkpoint", str(tmp_path / "run"), "--json"]) == 0
    printed = json.loads(capsys.readouterr().out)
    ref = perplexity(tmp_path / "run")
    assert printed["bits_per_byte"] == pytest.approx(ref["bits_per_byte"], rel=1e-6)
    assert printed["val_ppl"] == pytest.approx(ref["val_ppl"], rel=1e-6)
    (path,) = results_files(resolve_checkpoint(tmp_path / "run"), "perplexity")
    assert path.name.startswith("perplexity_3_")
    saved = json.loads(path.read_text())
    assert saved["bits_per_byte"] == printed["bits_per_byte"] and saved["step"] == 3

    assert main(["eval", "--checkpoint", str(tmp_path / "run"), "--samples", "4"]) == 0
    out = capsys.readouterr().out
    fewer = perplexity(tmp_path / "run", samples=4)
    assert fewer["tokens"] < ref["tokens"]
    assert f"validation loss {fewer['val_loss']:.4f} nats/token" in out
    assert f"{fewer['bits_per_byte']:.4f} bits/byte" in out
    # evaluating the checkpoint again kept the first results: one file per evaluation, in order
    files = results_files(resolve_checkpoint(tmp_path / "run"), "perplexity")
    first, second = (json.loads(p.read_text()) for p in files)
    assert first == saved
    assert second["tokens"] == fewer["tokens"] and second["val_loss"] == pytest.approx(fewer["val_loss"], rel=1e-6)
    assert not list((tmp_path / "run" / "eval").glob(".*"))  # no temporary file left behind


def test_results_written_whole_or_not_at_all(prepared_dir, tmp_path, monkeypatch):
    """An existing results file is never replaced, even by a write in the same microsecond; a
    write that fails (here: the rename) leaves neither a partial file nor its temporary file."""
    import os
    from datetime import datetime, timedelta, timezone

    import pretrain.eval

    save_checkpoint_on(prepared_dir, tmp_path / "run", LLAMA)
    step = resolve_checkpoint(tmp_path / "run")
    t0 = datetime(2025, 1, 31, 12, tzinfo=timezone.utc)
    ticks = iter([t0, t0, t0 + timedelta(microseconds=1), t0 + timedelta(seconds=1), t0 + timedelta(seconds=2)])

    class Clock(datetime):
        @classmethod
        def now(cls, tz=None):
            return next(ticks)

    monkeypatch.setattr(pretrain.eval, "datetime", Clock)
    first = pretrain.eval.write_results(step, "perplexity", {"val_loss": 1.0})
    second = pretrain.eval.write_results(step, "perplexity", {"val_loss": 2.0})
    assert (first.name, second.name) == ("perplexity_3_2025-01-31T12-00-00.000000.json",
                                         "perplexity_3_2025-01-31T12-00-00.000001.json")

    def fail(src, dst):
        raise OSError("disk full")

    monkeypatch.setattr(os, "link", fail)  # a filesystem without hard links: renamed instead
    third = pretrain.eval.write_results(step, "perplexity", {"val_loss": 3.0})
    assert json.loads(third.read_text()) == {"val_loss": 3.0}
    monkeypatch.setattr(os, "replace", fail)
    with pytest.raises(OSError, match="disk full"):
        pretrain.eval.write_results(step, "perplexity", {"val_loss": 4.0})
    assert sorted((tmp_path / "run" / "eval").iterdir()) == [first, second, third]
    assert [json.loads(p.read_text())["val_loss"] for p in results_files(step, "perplexity")] == [1.0, 2.0, 3.0]
