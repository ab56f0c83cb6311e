"""`pretrain train` with pipeline parallelism (two torchrun ranks, gloo) against one process: the
logged losses, gradient norms and validation losses of GPipe, 1F1B and ZBV (no validation: torch
cannot evaluate through it) runs of the tied-embedding SambaY, pp2 x dp_shard2 (FSDP2 inside
the stages) and pp2 x dp_replicate2 (HSDP) on four ranks, checkpoints that resume across the
layouts (pp2 -> one process, pp2 -> dp2 -> pp2, one process -> pp4 -> pp2) with the
same weights, optimizer state and data position as the uninterrupted single-process run, and
`pretrain eval` and `pretrain generate` on a pp2 checkpoint. The zbv run and the pp4 resume cut
stages inside blocks (parallel.pp_split "L.ffn"), with the same checkpoint names and values."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import pytest
import torch

from tests.conftest import ROOT, run_cli, set_args, tiny_overrides

REL = 1e-5


def _overrides(corpus, prepared, run_dir, **extra):
    # sambay_tiny's own 8-layer pattern (tied embeddings; SambaY's shared K/V cross the cut);
    # 8 sequences per step in micro-batches of 2: two pipeline rounds of 2 micro-batches
    values = {"train.max_steps": 4, "train.global_batch_size": 8, "train.eval_interval": 2, **extra}
    drop = ("model.layer_pattern", "model.n_layers")
    return [o for o in tiny_overrides(corpus, prepared, run_dir, **values) if not o.startswith(drop)]


def _torchrun(overrides: list[str], nproc: int = 2, config: str = "configs/sambay_tiny.toml") -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "WANDB_MODE": "disabled", "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
           "-m", "pretrain", "train", config, *set_args(overrides)]
    return subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)


def _records(run_dir) -> dict[int, dict]:
    out: dict[int, dict] = {}
    for r in map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines()):
        if "step" in r:
            out.setdefault(r["step"], {}).update(r)
    return out


def _assert_same_log(
    got: dict, want: dict, steps: list[int], keys=("loss", "val_loss", "grad_norm"), rel: float = REL
) -> float:
    """``keys`` (loss, validation loss, grad norm) of ``steps`` equal (rel <= REL); the worst rel."""
    assert sorted(got) == steps
    worst = 0.0
    for s in steps:
        for key in keys:
            if key in want[s]:
                a, b = got[s][key], want[s][key]
                worst = max(worst, abs(a - b) / abs(b))
                assert a == pytest.approx(b, rel=rel), (s, key, a, b)
    return worst


def _checkpoint(step_dir, tmp_path) -> dict:
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    out = tmp_path / f"{step_dir.parent.parent.name}-{step_dir.name}.pt"
    dcp_to_torch_save(str(step_dir), str(out))
    state = torch.load(out, weights_only=False)
    return {"model": state["model"], "optim": state["optim"]["state"],
            "train": json.loads((step_dir / "train_state.json").read_text())}


def _assert_same_checkpoint(got: dict, want: dict, rel: float = REL) -> None:
    """Every weight and AdamW moment under the same name, equal to ``rel``; same data position."""
    assert got["train"]["data"] == want["train"]["data"]
    assert sorted(got["model"]) == sorted(want["model"])
    for k, w in want["model"].items():
        torch.testing.assert_close(got["model"][k], w, rtol=rel, atol=rel * 1e-2, msg=k)
    assert sorted(got["optim"]) == sorted(want["optim"])
    for k, w in want["optim"].items():
        for m in ("exp_avg", "exp_avg_sq"):
            torch.testing.assert_close(got["optim"][k][m], w[m], rtol=rel, atol=rel * 1e-4, msg=f"{k} {m}")


def _max_differences(got: dict, want: dict) -> tuple[float, float]:
    """The largest absolute difference over all weights, and over all AdamW moments."""
    weights = max((got["model"][k] - w).abs().max().item() for k, w in want["model"].items())
    moments = max((got["optim"][k][m] - w[m]).abs().max().item()
                  for k, w in want["optim"].items() for m in ("exp_avg", "exp_avg_sq"))
    return weights, moments


def _resumable_copy(run_dir, new_dir, step: int) -> None:
    """``new_dir``: a run stopped after ``step``: its config and that checkpoint only."""
    new_dir.mkdir()
    shutil.copy(run_dir / "config.toml", new_dir / "config.toml")
    name = f"step-{step:08d}"
    shutil.copytree(run_dir / "checkpoints" / name, new_dir / "checkpoints" / name)


def test_pipeline_train_equals_single_process(small_corpus, prepared_dir, tmp_path):
    single = tmp_path / "single"
    result = run_cli(["train", "configs/sambay_tiny.toml", *set_args(_overrides(small_corpus, prepared_dir, single))])
    assert result.returncode == 0, result.stderr[-3000:]
    want = _records(single)

    # zbv: rank 0 holds the first and the last stage, so two copies of the tied embedding; its
    # stages are cut inside blocks, block 3's mixer half ending stage 1 and its FFN half starting
    # stage 2, both on rank 1 (one checkpoint entry blocks.3 holding both halves)
    for schedule, virtual in (("gpipe", 1), ("1f1b", 1), ("zbv", 2)):
        run = tmp_path / schedule
        inside = {"parallel.pp_split": '["1.ffn", "3.ffn", "5.ffn"]'} if schedule == "zbv" else {}
        result = _torchrun(_overrides(small_corpus, prepared_dir, run, **{
            "parallel.pp": 2, "parallel.pp_schedule": schedule, "parallel.pp_virtual_stages": virtual,
            "parallel.pp_microbatches": 2, **inside}))
        assert result.returncode == 0, result.stderr[-3000:]
        assert "2 pipeline micro-batches x 2 accumulation step(s)" in result.stdout
        keys = ("loss", "grad_norm") if schedule == "zbv" else ("loss", "val_loss", "grad_norm")
        if schedule == "zbv":
            assert "validation skipped" in result.stdout
        worst = _assert_same_log(_records(run), want, list(range(1, 5)), keys)
        print(f"{schedule}: worst relative difference of {'/'.join(keys)} vs one process {worst:.2e}")
    _assert_same_checkpoint(_checkpoint(tmp_path / "zbv/checkpoints/step-00000004", tmp_path),
                            _checkpoint(single / "checkpoints/step-00000004", tmp_path))

    # pp2 x dp_shard2 on 4 ranks: FSDP2 inside each stage. Its gradients are averaged over the two
    # half batches by a reduce-scatter, another summation order than one process, which AdamW
    # amplifies in tiny entries: the logs to 1e-4 as for FSDP alone (tests/distributed/test_fsdp.py),
    # the weights and moments after four AdamW steps to 1e-3 (measured: 8e-5 of the largest weight).
    run = tmp_path / "pp2_dp2"
    result = _torchrun(_overrides(small_corpus, prepared_dir, run, **{
        "parallel.pp": 2, "parallel.pp_microbatches": 2, "train.micro_batch_size": 1}), nproc=4)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "2 data-parallel rank(s) x 1 sequences per micro-batch x 2 pipeline micro-batches x 2" in result.stdout
    worst = _assert_same_log(_records(run), want, list(range(1, 5)), rel=1e-4)
    print(f"pp2 x dp_shard2: worst relative difference of loss/val_loss/grad_norm vs one process {worst:.2e}")
    _assert_same_checkpoint(_checkpoint(run / "checkpoints/step-00000004", tmp_path),
                            _checkpoint(single / "checkpoints/step-00000004", tmp_path), rel=1e-3)

    # pp2 x dp_replicate2 (HSDP inside the stages; one shard per replica): the replicas' gradients
    # averaged by an all-reduce, the clipping norm summed over one replica, to the same tolerance
    run = tmp_path / "pp2_hsdp"
    result = _torchrun(_overrides(small_corpus, prepared_dir, run, **{
        "parallel.pp": 2, "parallel.dp_replicate": 2, "parallel.pp_microbatches": 2,
        "train.micro_batch_size": 1}), nproc=4)
    assert result.returncode == 0, result.stderr[-3000:]
    worst = _assert_same_log(_records(run), want, list(range(1, 5)), rel=1e-4)
    print(f"pp2 x dp_replicate2: worst relative difference of loss/val_loss/grad_norm vs one process {worst:.2e}")
    _assert_same_checkpoint(_checkpoint(run / "checkpoints/step-00000004", tmp_path),
                            _checkpoint(single / "checkpoints/step-00000004", tmp_path), rel=1e-3)

    # The pp2 checkpoint holds the single-process names, weights and AdamW moments ...
    _assert_same_checkpoint(_checkpoint(tmp_path / "gpipe/checkpoints/step-00000002", tmp_path),
                            _checkpoint(single / "checkpoints/step-00000002", tmp_path))
    # ... `pretrain eval` reads it and scores what the run's last validation logged ...
    result = run_cli(["eval", "--checkpoint", str(tmp_path / "gpipe")])
    assert result.returncode == 0, result.stderr[-3000:]
    assert f"validation loss {want[4]['val_loss']:.4f} nats/token" in result.stdout

    # ... and resumes in one process, continuing the single-process run exactly
    to_one = tmp_path / "pp2_to_one"
    _resumable_copy(tmp_path / "gpipe", to_one, 2)
    result = run_cli(["train", "configs/sambay_tiny.toml", *set_args(_overrides(small_corpus, prepared_dir, to_one))])
    assert result.returncode == 0, result.stderr[-3000:]
    assert "resumed from step 2" in result.stdout and "at sample 16 " in result.stdout
    _assert_same_log(_records(to_one), want, [3, 4])

    # and the reverse, through pp4: a single-process checkpoint resumes under pp4 (four ranks, one
    # stage each, checkpoints every step), and its step-3 checkpoint under pp2 (1f1b)
    # (pp4's four stages, one per rank, cut inside blocks 1 and 5: SambaY's GMU memory and shared
    # K/V cross after block 5's mixer half)
    to_pp4 = tmp_path / "one_to_pp4"
    _resumable_copy(single, to_pp4, 2)
    result = _torchrun(_overrides(small_corpus, prepared_dir, to_pp4, **{
        "parallel.pp": 4, "parallel.pp_microbatches": 4, "checkpoint.interval": 1,
        "parallel.pp_split": '["1.ffn", 4, "5.ffn"]'}), nproc=4)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "resumed from step 2" in result.stdout and "at sample 16 " in result.stdout
    assert "4 stages starting at layers" in result.stdout
    # (its validation set is rounded up to 2 x 4 sequences, one round of 4 micro-batches)
    worst = _assert_same_log(_records(to_pp4), want, [3, 4], keys=("loss", "grad_norm"))
    print(f"one_to_pp4: worst relative difference of loss/grad_norm vs one process {worst:.2e}")
    to_pp = tmp_path / "pp4_to_pp2"
    _resumable_copy(to_pp4, to_pp, 3)
    result = _torchrun(_overrides(small_corpus, prepared_dir, to_pp, **{"parallel.pp": 2,
                                                                        "parallel.pp_schedule": "1f1b"}))
    assert result.returncode == 0, result.stderr[-3000:]
    assert "resumed from step 3" in result.stdout and "at sample 24 " in result.stdout
    _assert_same_log(_records(to_pp), want, [4])
    final = _checkpoint(single / "checkpoints/step-00000004", tmp_path)
    for run in (to_one, to_pp4, to_pp):
        _assert_same_checkpoint(got := _checkpoint(run / "checkpoints/step-00000004", tmp_path), final)
        print(f"{run.name}: max |weight| / |moment| difference vs one process %.1e / %.1e"
              % _max_differences(got, final))

    # The pp2 checkpoint resumes under dp2 (FSDP2 over two ranks, no pipeline; checkpoints every step), whose step-3
    # checkpoint resumes under pp2 again (the reverse). FSDP's reduce-scatter sums in another order:
    # the tolerances of pp2 x dp_shard2 above.
    pp2_to_dp2 = tmp_path / "pp2_to_dp2"
    _resumable_copy(tmp_path / "gpipe", pp2_to_dp2, 2)
    result = _torchrun(_overrides(small_corpus, prepared_dir, pp2_to_dp2, **{"checkpoint.interval": 1}))
    assert result.returncode == 0, result.stderr[-3000:]
    assert "resumed from step 2" in result.stdout and "at sample 16 " in result.stdout
    assert "stages starting at layers" not in result.stdout
    worst = _assert_same_log(_records(pp2_to_dp2), want, [3, 4], rel=1e-4)
    print(f"pp2_to_dp2: worst relative difference of loss/val_loss/grad_norm vs one process {worst:.2e}")
    dp2_to_pp2 = tmp_path / "dp2_to_pp2"
    _resumable_copy(pp2_to_dp2, dp2_to_pp2, 3)
    result = _torchrun(_overrides(small_corpus, prepared_dir, dp2_to_pp2, **{
        "parallel.pp": 2, "parallel.pp_microbatches": 2}))
    assert result.returncode == 0, result.stderr[-3000:]
    assert "resumed from step 3" in result.stdout and "at sample 24 " in result.stdout
    worst = _assert_same_log(_records(dp2_to_pp2), want, [4], rel=1e-4)
    print(f"dp2_to_pp2: worst relative difference of loss/val_loss/grad_norm vs one process {worst:.2e}")
    for run in (pp2_to_dp2, dp2_to_pp2):
        _assert_same_checkpoint(got := _checkpoint(run / "checkpoints/step-00000004", tmp_path), final, rel=1e-3)
        print(f"{run.name}: max |weight| / |moment| difference vs one process %.1e / %.1e"
              % _max_differences(got, final))

    # `pretrain generate` reads a pp2 checkpoint: greedy text equal to the one-process checkpoint's
    # of the same step. At step 2 greedy text repeats one word whatever small error the weights
    # carry, so the model it loads is also checked by its logits on random tokens (measured: 1e-7).
    from pretrain.train.checkpoint import load_for_inference

    texts, logits = [], []
    ids = torch.randint(0, 256, (2, 32), generator=torch.Generator().manual_seed(0))
    for run in (tmp_path / "gpipe", single):
        result = run_cli(["generate", "--checkpoint", str(run / "checkpoints/step-00000002"),
                          "--prompt", "And God said", "--max-new-tokens", "12", "--greedy"])
        assert result.returncode == 0, result.stderr[-3000:]
        texts.append(result.stdout)
        cfg, model, _ = load_for_inference(run / "checkpoints/step-00000002")
        assert cfg.model.vocab_size == 256
        with torch.no_grad():
            logits.append(model(ids))
    assert texts[0].startswith("And God said") and texts[0] == texts[1], texts
    torch.testing.assert_close(logits[0], logits[1], rtol=REL, atol=1e-6)
    print(f"generate on pp2: max |logit| difference vs one process {(logits[0] - logits[1]).abs().max():.1e}")


def test_pipeline_with_compile_is_refused():
    from parallel.dims import ParallelDims
    from pretrain.config import ConfigError, load_config
    from pretrain.train.pipeline_step import PipelineTrainer

    cfg = load_config(None, ["parallel.pp=2", "parallel.dp_replicate=2", "train.compile=true"])
    trainer = PipelineTrainer.__new__(PipelineTrainer)  # only the layout check, no process group
    trainer.dims = ParallelDims.from_config(cfg.parallel, 4)
    with pytest.raises(ConfigError, match=r"^train\.compile: ") as err:
        trainer._check_layout(cfg)
    assert "\n" not in str(err.value)
    trainer._check_layout(load_config(None, ["parallel.pp=2", "parallel.dp_replicate=2"]))  # HSDP runs
