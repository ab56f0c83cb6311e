"""FSDP2 data parallelism on CPU/gloo against a single process at the same global batch:
every gradient of one step in-process, and the losses of whole runs through torchrun."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from tests.conftest import ROOT, end_spawned_rank, losses, run_cli, set_args, tiny_overrides

GLOBAL_BATCH, SEQ, VOCAB = 4, 16, 64


def _model():
    from pretrain.config import load_config
    from pretrain.models import build_model

    cfg = load_config(None, [
        f"model.vocab_size={VOCAB}", "model.d_model=32", "model.n_layers=3",
        "model.layer_pattern='mamba swa attn'", "model.attention.n_heads=4",
        "model.attention.n_kv_heads=2", "model.attention.window=6", "model.mamba.d_state=4",
        "model.tie_embeddings=false",
    ])
    torch.manual_seed(0)
    return build_model(cfg.model)


def _batch():
    g = torch.Generator().manual_seed(1)
    tokens = torch.randint(0, VOCAB, (GLOBAL_BATCH, SEQ + 1), generator=g)
    # two documents in every row, split at a different place each row
    position_ids = torch.cat([torch.arange(SEQ)] * GLOBAL_BATCH).view(GLOBAL_BATCH, SEQ).clone()
    for row in range(GLOBAL_BATCH):
        cut = 3 + 2 * row
        position_ids[row, cut:] = torch.arange(SEQ - cut)
    return tokens[:, :-1], tokens[:, 1:], position_ids


def _loss_and_grads(model, rows, micro: int, sync=None):
    from pretrain.train.trainer import lm_loss

    inputs, labels, pos = _batch()
    chunks = [rows[i : i + micro] for i in range(0, len(rows), micro)]
    total = 0.0
    for i, chunk in enumerate(chunks):
        if sync is not None:
            sync(i == len(chunks) - 1)
        loss = lm_loss(model(inputs[chunk], position_ids=pos[chunk]), labels[chunk]) / len(chunks)
        loss.backward()
        total += loss.item()
    return total


def _rank_main(rank: int, world: int, store: str, out: str) -> None:
    from torch.distributed.device_mesh import init_device_mesh

    from parallel.data import apply_fsdp

    torch.set_num_threads(1)
    dist.init_process_group("gloo", store=dist.FileStore(store, world), rank=rank, world_size=world)
    model = _model()
    mesh = init_device_mesh("cpu", (1, world), mesh_dim_names=("dp_replicate", "dp_shard"))
    apply_fsdp(model, mesh)
    per_rank = GLOBAL_BATCH // world
    rows = list(range(rank * per_rank, (rank + 1) * per_rank))
    loss = torch.tensor(_loss_and_grads(model, rows, micro=1, sync=model.set_requires_gradient_sync))
    dist.all_reduce(loss)
    grads = {n: p.grad.full_tensor() for n, p in model.named_parameters()}
    if rank == 0:
        torch.save({"loss": loss.item() / world, "grads": grads}, out)
    end_spawned_rank()


def test_fsdp_gradients_equal_single_process(tmp_path):
    out = tmp_path / "fsdp.pt"
    mp.start_processes(_rank_main, args=(2, str(tmp_path / "store"), str(out)), nprocs=2, start_method="spawn")
    fsdp = torch.load(out)

    reference = _model()
    loss = _loss_and_grads(reference, list(range(GLOBAL_BATCH)), micro=2)
    assert fsdp["loss"] == pytest.approx(loss, rel=1e-5)
    names = [n for n, _ in reference.named_parameters()]
    assert sorted(fsdp["grads"]) == sorted(names)
    for name, p in reference.named_parameters():
        torch.testing.assert_close(fsdp["grads"][name], p.grad, rtol=1e-4, atol=1e-6, msg=name)


def _val_losses(run_dir) -> list[tuple[int, float]]:
    return [(r["step"], r["val_loss"]) for r in map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines())
            if "val_loss" in r]


def test_torchrun_two_ranks_match_one_process(small_corpus, prepared_dir, tmp_path):
    single = tmp_path / "single"
    overrides = {"train.eval_samples": 5}
    result = run_cli(["train", *set_args(tiny_overrides(small_corpus, prepared_dir, single, **overrides))])
    assert result.returncode == 0, result.stderr

    double = tmp_path / "double"
    env = {**os.environ, "PYTHONPATH": str(ROOT), "WANDB_MODE": "disabled", "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           "-m", "pretrain", "train", *set_args(tiny_overrides(small_corpus, prepared_dir, double, **overrides))]
    result = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]

    a, b = losses(single), losses(double)
    assert [s for s, _ in a] == [s for s, _ in b] == list(range(1, 9))
    for (step, la), (_, lb) in zip(a, b):
        assert lb == pytest.approx(la, rel=1e-4), step
    # validation scores the same tokens on any number of ranks: sums of token losses and counts
    # are reduced, never a mean of the ranks' means (eval_samples=5 leaves rank 1 a padding row)
    va, vb = _val_losses(single), _val_losses(double)
    assert [s for s, _ in va] == [s for s, _ in vb] == [4, 8]
    print("dp2 vs one process, val_loss:", [(s, x, y, abs(y - x) / x) for (s, x), (_, y) in zip(va, vb)])
    for (step, la), (_, lb) in zip(va, vb):
        assert lb == pytest.approx(la, rel=1e-6), step

    # The 2-rank checkpoint resumes in one process (another layout) and continues the run.
    more = tiny_overrides(small_corpus, prepared_dir, double, **overrides, **{"train.max_steps": 10})
    result = run_cli(["train", *set_args(more)])
    assert result.returncode == 0, result.stderr
    assert "resumed from step 8" in result.stdout
    assert [s for s, _ in losses(double)] == list(range(1, 11))
