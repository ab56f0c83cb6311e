"""The commands end to end on a tiny model: train, generate, eval, plan; bad input exits 2."""

from __future__ import annotations

import json
import math

import pytest
import torch

from tests.conftest import losses, run_cli, set_args, tiny_overrides


@pytest.fixture(scope="module")
def trained(small_corpus, prepared_dir, tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("run")
    result = run_cli(["train", *set_args(tiny_overrides(small_corpus, prepared_dir, run_dir))])
    assert result.returncode == 0, result.stderr
    return run_dir, result


def test_train_writes_run_directory(trained):
    run_dir, result = trained
    assert [s for s, _ in losses(run_dir)] == list(range(1, 9))
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    last = records[-1]
    for key in ("loss", "lr", "grad_norm", "tokens_per_s", "mfu", "peak_mem_gb", "val_loss", "val_ppl"):
        assert key in last, key
    assert (run_dir / "config.toml").is_file() and (run_dir / "loss.png").stat().st_size > 0
    steps = sorted(p.name for p in (run_dir / "checkpoints").iterdir())
    assert steps == ["step-00000002", "step-00000004", "step-00000006", "step-00000008"]
    assert (run_dir / "checkpoints" / "step-00000008" / "config.toml").read_text() == (
        run_dir / "config.toml"
    ).read_text()
    assert "unigram baseline" in result.stdout


def test_generate_greedy_is_deterministic(trained):
    run_dir, _ = trained
    args = ["generate", "--checkpoint", str(run_dir), "--prompt", "And God said", "--max-new-tokens", "12", "--greedy"]
    first, second = run_cli(args), run_cli(args)
    assert first.returncode == 0, first.stderr
    assert first.stdout.startswith("And God said") and len(first.stdout.strip()) > len("And God said")
    assert first.stdout == second.stdout
    sampled = run_cli(["generate", "--checkpoint", str(run_dir / "checkpoints" / "step-00000004"),
                       "--max-new-tokens", "8", "--top-k", "5", "--seed", "3"])
    assert sampled.returncode == 0, sampled.stderr


def test_eval_matches_training_validation(trained):
    run_dir, _ = trained
    result = run_cli(["eval", "--checkpoint", str(run_dir)])
    assert result.returncode == 0, result.stderr
    val = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()][-1]["val_loss"]
    reported = float(result.stdout.split("validation loss ")[1].split()[0])
    assert reported == pytest.approx(val, abs=1e-4)


def test_plan_reports_parameter_counts(small_corpus, prepared_dir, tmp_path):
    from pretrain.config import load_config
    from pretrain.models import build_model

    overrides = tiny_overrides(small_corpus, prepared_dir, tmp_path, **{"model.vocab_size": 256})
    result = run_cli(["plan", "configs/tiny.toml", *set_args(overrides)])
    assert result.returncode == 0, result.stderr
    model = build_model(load_config("configs/tiny.toml", overrides).model)
    assert f"{sum(p.numel() for p in model.parameters()):,}" in result.stdout
    assert "FLOPs per token" in result.stdout and "GiB" in result.stdout


@pytest.mark.parametrize(
    "args, needle",
    [
        (["train", "configs/tiny.toml", "--set", "train.max_steps=-3"], "train.max_steps"),
        (["train", "configs/tiny.toml", "--set", "model.attention.n_heads=5"], "model.attention.n_heads"),
        (["train", "configs/tiny.toml", "--set", "optim.lrr=1"], "optim.lrr"),
        (["train", "configs/nope.toml"], "configs/nope.toml"),
        (["prepare", "configs/tiny.toml", "--set", "data.sources=['/nonexistent/x.jsonl']",
          "--set", "data.dir='/tmp/pretrain-test-never'"], "/nonexistent/x.jsonl"),
        (["generate", "--checkpoint", "/nonexistent/run"], "/nonexistent/run"),
    ],
)
def test_bad_input_exits_2_with_one_line(args, needle):
    result = run_cli(args)
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and needle in lines[0] and "Traceback" not in result.stderr


def test_divergence_stops_before_a_bad_step_is_saved(small_corpus, prepared_dir, tmp_path):
    """A learning rate that blows the weights up: the non-finite steps are skipped and counted,
    train.max_skipped_steps of them in a row end the run with one line and exit 1; no checkpoint
    ever holds a non-finite value, and only the skipped steps' records a non-finite loss."""
    overrides = tiny_overrides(small_corpus, prepared_dir, tmp_path, **{
        "optim.lr": "1e30", "optim.warmup_steps": 0, "train.grad_clip": 0.0, "checkpoint.interval": 1,
        "train.max_skipped_steps": 2,
    })
    result = run_cli(["train", *set_args(overrides)])
    assert result.returncode == 1, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "2 consecutive steps with a non-finite loss or gradient" in lines[0]
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    skipped = 0
    for r in (r for r in records if "loss" in r):
        skipped += not math.isfinite(r["loss"])
        assert r["skipped_steps"] == skipped
    assert skipped == 1  # the second stops the run before its record
    from pretrain.train.checkpoint import load_for_inference

    steps = sorted((tmp_path / "checkpoints").iterdir())
    assert all(not p.name.endswith(".tmp") for p in steps)
    if steps:
        _, model, _ = load_for_inference(steps[-1])
        assert all(torch.isfinite(p).all() for p in model.parameters())
