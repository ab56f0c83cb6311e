"""Resuming under a changed config. A change that moves the data position (the sample order the
checkpoint's consumed_samples counts in) exits 2 with one line naming the field, before anything
is written; the global batch size, the micro-batch size, a moved data.dir and non-data settings
carry over exactly: the resumed run reads the same samples as a run that never stopped."""

from __future__ import annotations

import hashlib
import json
import shutil
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch

from pretrain.cli import main
from pretrain.config import load_config
from pretrain.data import prepare
from pretrain.data.loader import PackedLoader
from pretrain.train.trainer import train
from tests.conftest import data_overrides, set_args, tiny_overrides

STOPPED_AT = 4  # the stopped run: 4 steps of 4 samples, checkpoints at steps 2 and 4
SAMPLES = 32  # samples of the uninterrupted 8-step run


def _quiet(*_):
    pass


@contextmanager
def _recording():
    """Collects the input rows of every training step ([mb, T] tensors, in order)."""
    rows: list[torch.Tensor] = []
    original = PackedLoader.next_step

    def next_step(self):
        batches = original(self)
        if self.datasets[0].prefix.endswith("train"):  # not the validation loader
            rows.extend(b["input_ids"] for b in batches)
        return batches

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(PackedLoader, "next_step", next_step)
        yield rows


def _snapshot(*dirs: Path) -> dict[str, str]:
    return {
        str(p): hashlib.sha256(p.read_bytes()).hexdigest() for d in dirs for p in sorted(d.rglob("*")) if p.is_file()
    }


@pytest.fixture(scope="module")
def reference(small_corpus, prepared_dir, tmp_path_factory) -> torch.Tensor:
    """Input rows [32, 32] of an uninterrupted 8-step run."""
    run_dir = tmp_path_factory.mktemp("straight")
    with _recording() as rows:
        train(load_config(None, tiny_overrides(small_corpus, prepared_dir, run_dir)), log=_quiet)
    out = torch.cat(rows)
    assert out.shape == (SAMPLES, 32) and len({tuple(r.tolist()) for r in out}) == SAMPLES  # no repeats
    return out


@pytest.fixture(scope="module")
def stopped(small_corpus, prepared_dir, tmp_path_factory) -> Path:
    run_dir = tmp_path_factory.mktemp("stopped")
    cfg = load_config(None, tiny_overrides(small_corpus, prepared_dir, run_dir, **{"train.max_steps": STOPPED_AT}))
    train(cfg, log=_quiet)
    return run_dir


@pytest.fixture
def run_copy(stopped, tmp_path) -> Path:
    """A fresh copy of the stopped run for one test to resume (or fail to)."""
    return Path(shutil.copytree(stopped, tmp_path / "run"))


def _resume(overrides: list[str]) -> tuple[torch.Tensor, list[str]]:
    log: list[str] = []
    with _recording() as rows:
        train(load_config(None, overrides), log=log.append)
    assert any(line.startswith(f"resumed from step {STOPPED_AT} ") for line in log), log
    return torch.cat(rows), log


@pytest.mark.parametrize(
    "changes",
    [
        {"train.global_batch_size": 8, "train.max_steps": 6},
        {"train.global_batch_size": 2, "train.micro_batch_size": 1, "train.max_steps": 12},
    ],
    ids=["batch-4-to-8", "batch-4-to-2"],
)
def test_global_batch_size_change_reads_the_same_samples(changes, reference, run_copy, small_corpus, prepared_dir):
    rows, _ = _resume(tiny_overrides(small_corpus, prepared_dir, run_copy, **changes))
    assert torch.equal(rows, reference[STOPPED_AT * 4 :])  # nothing skipped or repeated


def test_safe_changes_resume_on_the_same_samples(reference, run_copy, small_corpus, prepared_dir, tmp_path):
    moved = Path(shutil.copytree(prepared_dir, tmp_path / "moved-data"))
    changes = {
        "optim.lr": 1e-3,
        "optim.warmup_steps": 0,
        "train.log_interval": 2,
        "train.eval_interval": 2,
        "train.eval_samples": 8,
        "train.micro_batch_size": 1,
        "checkpoint.interval": 3,
    }
    rows, log = _resume(tiny_overrides(small_corpus, moved, run_copy, **changes))
    assert torch.equal(rows, reference[STOPPED_AT * 4 :])
    (note,) = [line for line in log if line.startswith("learning-rate schedule changed on resume")]
    assert "(train.max_steps 4 -> 8, optim.lr 0.003 -> 0.001, optim.warmup_steps 2 -> 0)" in note and "step 5 trains at" in note
    assert (run_copy / "checkpoints" / "step-00000008").is_dir()
    assert load_config(run_copy / "config.toml").optim.lr == 1e-3


def _refused(overrides: list[str], capsys, extra: tuple[str, ...] = ()) -> str:
    capsys.readouterr()
    rc = main(["train", *set_args(overrides), *extra])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1, err
    return err[0]


@pytest.mark.parametrize(
    "field, value",
    [
        ("data.seq_len", "64"),  # the issue: half of epoch 1 was skipped
        ("train.seed", "7"),
        ("data.valid_fraction", "0.1"),
        ("data.vocab_size", "300"),
        ("data.tokenizer_type", "'unigram'"),
        ("data.text_field", "'body'"),
        ("data.sources", "['{corpus}', 'builtin:shakespeare']"),
    ],
)
def test_data_order_change_exits_2_and_writes_nothing(field, value, run_copy, small_corpus, prepared_dir, capsys):
    base = tiny_overrides(small_corpus, prepared_dir, run_copy)
    changed = base + [f"{field}={value.format(corpus=small_corpus)}"]
    old, new = (getattr(getattr(load_config(None, o), s), k) for o in (base, changed) for s, k in [field.split(".")])
    before = _snapshot(run_copy, prepared_dir)
    line = _refused(changed, capsys)
    assert line.startswith(f"pretrain train: error: {field}: {json.dumps(new)} differs from {json.dumps(old)} ")
    assert "step-00000004" in line and "run.dir" in line
    assert _snapshot(run_copy, prepared_dir) == before  # neither the run nor the prepared data touched


@pytest.fixture(scope="module")
def two_sources(small_corpus, tmp_path_factory) -> tuple[list[str], Path]:
    """Overrides preparing two sources (the corpus and its first 30 documents) in a data dir."""
    root = tmp_path_factory.mktemp("two")
    second = root / "second.jsonl"
    second.write_text("\n".join(small_corpus.read_text().splitlines()[:30]) + "\n")
    overrides = data_overrides(small_corpus, root / "data") + [f"data.sources=['{small_corpus}', '{second}']"]
    prepare(load_config(None, overrides).data, log=_quiet)
    return overrides, root / "data"


def test_blend_weights_change_is_refused_unless_the_blend_is_the_same(two_sources, small_corpus, tmp_path, capsys):
    data, data_dir = two_sources
    run_dir = tmp_path / "run"
    base = tiny_overrides(small_corpus, data_dir, run_dir, **{"train.max_steps": 2, "optim.warmup_steps": 1})
    base += data[-1:]
    train(load_config(None, base + ["data.weights=[1, 1]"]), log=_quiet)
    before = _snapshot(run_dir, data_dir)
    for weights in ("[1, 3]", "[]"):  # [] is token shares, not 1:1
        line = _refused(base + [f"data.weights={weights}", "train.max_steps=3"], capsys)
        assert line.startswith(f"pretrain train: error: data.weights: {weights} differs from [1, 1] "), line
    assert _snapshot(run_dir, data_dir) == before
    log: list[str] = []
    train(load_config(None, base + ["data.weights=[2, 2]", "train.max_steps=3"]), log=log.append)
    assert any(line.startswith("resumed from step 2 ") for line in log)


def test_changed_prepared_data_is_refused(small_corpus, tmp_path, capsys):
    """The corpus edited in place: prepare rebuilds data.dir on resume, whose tokens then differ
    from the checkpoint's; the config fields alone cannot tell."""
    lines = small_corpus.read_text().splitlines()
    corpus = tmp_path / "corpus.jsonl"
    corpus.write_text("\n".join(lines[:40]) + "\n")
    run_dir = tmp_path / "run"
    overrides = tiny_overrides(corpus, tmp_path / "data", run_dir, **{"train.max_steps": 2, "optim.warmup_steps": 1})
    train(load_config(None, overrides), log=_quiet)
    corpus.write_text("\n".join(lines[1:40]) + "\n")
    before = _snapshot(run_dir)
    line = _refused(overrides + ["train.max_steps=4"], capsys)
    assert line.startswith("pretrain train: error: data.dir: ") and "step-00000002" in line, line
    assert _snapshot(run_dir) == before


def test_init_from_starts_a_new_run_from_the_weights(stopped, small_corpus, prepared_dir, tmp_path, capsys):
    """The way on after a refused change: a new run at data.seq_len 64 starts from the stopped
    run's weights with a fresh optimizer, step and data order, and resumes its own checkpoints
    when requeued with the same command."""
    from pretrain.config import ConfigError
    from pretrain.train import checkpoint as ckpt
    from pretrain.train.trainer import Trainer

    new_run = tmp_path / "longer"
    overrides = tiny_overrides(small_corpus, prepared_dir, new_run, **{"data.seq_len": 64, "train.max_steps": 4})
    trainer = Trainer(load_config(None, overrides), log=_quiet, init_from=str(stopped))
    _, reference_model, _ = ckpt.load_for_inference(stopped)
    expected = reference_model.state_dict()
    assert trainer.step == 0 and trainer.loader.consumed_samples == 0
    assert all(torch.equal(v, expected[k]) for k, v in trainer.model.state_dict().items())
    assert not any(s for group in trainer.optimizer.state.values() for s in group.values())  # fresh

    args = ["train", *set_args(overrides), "--init-from", str(stopped)]
    assert main(args + ["--set", "train.max_steps=3", "--set", "checkpoint.interval=3"]) == 0
    assert "initialised from the model weights of" in capsys.readouterr().out
    assert main(args) == 0  # requeued: its own step 3 wins over --init-from
    out = capsys.readouterr().out
    assert "resumed from step 3 " in out and "initialised" not in out

    wider = tiny_overrides(small_corpus, prepared_dir, tmp_path / "wider", **{"model.d_model": 48})
    line = _refused(wider, capsys, ("--init-from", str(stopped)))
    assert "holds another model" in line and "model.d_model 32 -> 48" in line
    with pytest.raises(ConfigError, match="^data.tokenizer: the run's tokenizer is not the one"):
        ckpt.load_model_weights(stopped, trainer.model, "0" * 64)
