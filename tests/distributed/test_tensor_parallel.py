"""Tensor and sequence parallelism on CPU/gloo against a single process with the same weights
and batch: the loss of two SGD steps (the first with packed documents), every parameter gradient
of the first (gathered from the shards) and the clipped global norm, at tp 2 with and without
sequence parallelism, for each family whose layers have plans. One process group for all."""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from tests.conftest import end_spawned_rank
from tests.distributed.test_pipeline import BATCH, CLIP, LR, MICRO, SEED, VOCAB, _batch, _rel


CASES = {
    "llama_tiny": ("configs/llama_tiny.toml", ["model.d_model=32", "model.n_layers=2", "model.attention.n_heads=4"]),
    # tied embeddings: the vocabulary-parallel embedding is also the head
    "attn_tied": ("configs/llama_tiny.toml", [
        "model.d_model=32", "model.n_layers=2", "model.attention.n_heads=4", "model.tie_embeddings=true",
        'model.layer_pattern="swa attn"', "model.attention.window=5",
    ]),
    "tiny": ("configs/tiny.toml", [  # Mamba-1 (x_proj's partial sums) + SWA, tied embeddings
        "model.d_model=32", "model.n_layers=2", "model.attention.window=5", "model.mamba.d_state=4",
    ]),
    "gla_tiny": ("configs/gla_tiny.toml", ["model.d_model=32", "model.n_layers=2", "model.gla.chunk_size=4"]),
    "mamba2_tiny": ("configs/mamba2_tiny.toml", [  # one B/C group: replicated, the gated norm spans ranks
        "model.d_model=32", "model.n_layers=2", "model.mamba2.d_state=4", "model.mamba2.chunk_size=4",
    ]),
    "titans": ("configs/titans_mac_tiny.toml", [
        "model.d_model=32", 'model.layer_pattern=["mac","mag","mal"]', "model.n_layers=3",
        "model.titans.segment_size=4", "model.titans.chunk_size=2", "model.titans.n_persistent=2",
        "model.attention.window=6",
    ]),
    # the memory and the shared K/V cross layers as per-rank shards
    "sambay": ("configs/sambay_tiny.toml", ["model.d_model=32", "model.attention.window=5", "model.mamba.d_state=4"]),
    # the router, GRU and auxiliary loss replicated, each expert split within itself
    "rmoe": ("configs/rmoe_tiny.toml", [
        "model.d_model=32", "model.n_layers=2", "model.moe.n_experts=4", "model.moe.router_hidden=8",
        "model.moe.aux_loss_coef=0.05",
    ]),
    "hybrid_mix": ("configs/hybrid_mix.toml", [
        "model.d_model=32", "model.n_layers=4", "model.moe.n_experts=4", "model.moe.router_hidden=8",
        "model.moe.aux_loss_coef=0.05", "model.attention.window=5", "model.mamba.d_state=4",
    ]),
    "diff": ("configs/llama_tiny.toml", [
        "model.d_model=32", 'model.layer_pattern="diff_swa diff_attn"', "model.n_layers=2",
        "model.attention.n_heads=4", "model.attention.n_kv_heads=2", "model.attention.window=5",
    ]),
}


pytestmark = pytest.mark.usefixtures("one_thread")


def _config(name: str):
    from pretrain.config import load_config

    path, overrides = CASES[name]
    return load_config(path, [f"model.vocab_size={VOCAB}", *overrides]).model


def _run(name: str, mesh=None, sequence_parallel: bool = False, dp_mesh=None) -> dict:
    """Two SGD steps of MICRO-row micro-batches: losses, first-step gradients (full tensors)
    and the clipped norms; one process when ``mesh`` is None. With ``dp_mesh``, FSDP2 over it
    (after TP, as the trainer) and each data-parallel rank runs its share of the rows."""
    from torch.distributed.fsdp import fully_shard

    from parallel.grad_norm import clip_grad_norm_
    from parallel.tensor.region import apply_tp
    from pretrain.models import build_model
    from pretrain.train.trainer import lm_loss

    torch.manual_seed(SEED)
    model = build_model(_config(name))
    if mesh is not None:
        apply_tp(model, mesh, sequence_parallel)
    dp, dp_rank = (1, 0) if dp_mesh is None else (dp_mesh.size(), dp_mesh.get_local_rank())
    if dp_mesh is not None:
        for block in model.blocks.values():
            fully_shard(block, mesh=dp_mesh)
        fully_shard(model, mesh=dp_mesh)
    opt = torch.optim.SGD(model.parameters(), lr=LR)
    inputs, labels, pos = _batch()
    n = BATCH // MICRO // dp
    out: dict = {"losses": [], "norms": []}
    for step in range(2):
        total = torch.zeros(())
        for i in range(n):
            rows = slice((dp_rank * n + i) * MICRO, (dp_rank * n + i + 1) * MICRO)
            if mesh is None:  # the reference: materialised logits, F.cross_entropy
                logits, aux = model(inputs[rows], position_ids=pos[rows], return_aux=True)
                loss = lm_loss(logits, labels[rows])
            else:  # the vocabulary-parallel head fused with the loss, as the trainer runs it
                loss, aux = model(inputs[rows], position_ids=pos[rows], labels=labels[rows], return_aux=True)
            loss = loss + aux.get("aux_loss", 0.0)
            (loss / n).backward()  # FSDP2 averages over the data-parallel ranks
            total += loss.detach() / n
        if dp_mesh is not None:
            dist.all_reduce(total, group=dp_mesh.get_group())
            total /= dp
        out["losses"].append(total.item())
        if step == 0:
            out["grads"] = {
                k: (p.grad.full_tensor() if hasattr(p.grad, "full_tensor") else p.grad).clone()
                for k, p in model.named_parameters()
            }
        if mesh is None:
            norm = torch.nn.utils.clip_grad_norm_(model.parameters(), CLIP)
        else:
            norm = clip_grad_norm_([p.grad for p in model.parameters()], CLIP)
        out["norms"].append(norm.item())
        opt.step()
        opt.zero_grad(set_to_none=True)
    return out


def _rank_main(rank: int, world: int, store: str, out_dir: str) -> None:
    from torch.distributed.device_mesh import init_device_mesh

    torch.set_num_threads(1)
    dist.init_process_group("gloo", store=dist.FileStore(store, world), rank=rank, world_size=world)
    mesh = init_device_mesh("cpu", (world,), mesh_dim_names=("tp",))
    results = {(name, sp): _run(name, mesh, sp) for name in CASES for sp in (False, True)}
    torch.save(results, f"{out_dir}/rank{rank}.pt")
    end_spawned_rank()


def _check(name: str, part: dict, ref: dict, what: str) -> None:
    for got, want in zip(part["losses"], ref["losses"]):
        assert abs(got - want) <= 1e-5 * abs(want), (what, got, want)
    assert sorted(part["grads"]) == sorted(ref["grads"]), what
    for k, want in ref["grads"].items():
        # a differential-attention lambda's gradient sums the two maps' opposite
        # contributions over every head: its fp32 rounding shows at ~1e-5 when the
        # heads are summed per rank first
        tol = 5e-5 if ".lambda_" in k else 1e-5
        assert _rel(part["grads"][k], want) <= tol, (what, k, _rel(part["grads"][k], want))
    assert ref["norms"][0] > CLIP
    for got, want in zip(part["norms"], ref["norms"]):
        assert abs(got - want) <= 1e-5 * want, (what, got, want)


def test_tensor_parallel_equals_single_process(tmp_path):
    mp.start_processes(_rank_main, args=(2, str(tmp_path / "store"), str(tmp_path)), nprocs=2, start_method="spawn")
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(2)]
    for name in CASES:
        ref = _run(name)
        for sp in (False, True):
            for part in (r[name, sp] for r in ranks):
                _check(name, part, ref, f"{name} sp={sp}")


DP_TP_CASES = ("tiny", "gla_tiny", "mamba2_tiny", "titans", "sambay", "rmoe")


def _rank_main_dp_tp(rank: int, world: int, store: str, out_dir: str) -> None:
    from torch.distributed.device_mesh import init_device_mesh

    torch.set_num_threads(1)
    dist.init_process_group("gloo", store=dist.FileStore(store, world), rank=rank, world_size=world)
    mesh = init_device_mesh("cpu", (2, 2), mesh_dim_names=("dp_shard", "tp"))
    results = {name: _run(name, mesh["tp"], True, mesh["dp_shard"]) for name in DP_TP_CASES}
    torch.save(results, f"{out_dir}/rank{rank}.pt")
    end_spawned_rank()


def test_fsdp_x_tensor_parallel_equals_single_process(tmp_path):
    """dp_shard2 x tp2 on 4 ranks: FSDP2 over DTensor parameters already sharded by TP, for six
    families (tied embeddings, GLA, Mamba-2, Titans, SambaY, RMoE)."""
    mp.start_processes(
        _rank_main_dp_tp, args=(4, str(tmp_path / "store"), str(tmp_path)), nprocs=4, start_method="spawn"
    )
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(4)]
    for name in DP_TP_CASES:
        ref = _run(name)
        for r, part in enumerate(ranks):
            _check(name, part[name], ref, f"{name} dp2 x tp2 rank {r}")
