"""Expert parallelism (parallel/expert.py) on CPU/gloo against one process: two ranks, ep = 2,
each with its own micro-batch and half of every MoE layer's experts, for an RMoE model (GRU
router, 'global' balance loss) and a softmax-router 'moe' model ('per_layer' balance, z-loss,
shared expert). After each rank's backward, the non-expert gradients are averaged over the two
ranks (data parallelism) and the expert gradients left alone: the mean of the ranks' losses
(LM + auxiliary), the aux losses, the logged expert loads and every gradient must equal one
process running both micro-batches as one batch (float32, relative error <= 1e-5). At these
seeds the RMoE model's first layer routes no token to rank 0's experts, so the path of a rank
that receives no rows (which must still join the backward all-to-alls and give its experts zero
gradients) is exercised too. On four ranks (dp_shard=4, ep=2, the Trainer's DTensor experts), the
expert gradients averaged over the ranks holding the same experts and the global gradient norm
(each expert shard counted once) equal one process."""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch.distributed.tensor import DTensor

from pretrain.config import ConfigError, load_config
from tests.conftest import end_spawned_rank

WORLD, ROWS, SEQ, VOCAB, SEED = 2, 2, 12, 64, 0  # ROWS: sequences per rank

CASES = {
    "rmoe": ("configs/rmoe_tiny.toml", [
        "model.d_model=32", "model.n_layers=3", "model.moe.router_hidden=8", "model.moe.expert_hidden=16",
        "model.moe.aux_loss_coef=0.1",
    ]),
    "moe": ("configs/rmoe_tiny.toml", [
        "model.d_model=32", "model.n_layers=2", "model.layer_pattern='attn:moe'", "model.moe.expert_hidden=16",
        "model.moe.balance='per_layer'", "model.moe.aux_loss_coef=0.1", "model.moe.z_loss_coef=0.01",
        "model.moe.shared_expert=true",
    ]),
}


def _model(case: str):
    from pretrain.models import build_model

    path, overrides = CASES[case]
    cfg = load_config(path, [f"model.vocab_size={VOCAB}", *overrides]).model
    torch.manual_seed(SEED)
    return build_model(cfg)


def _batch():
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, VOCAB, (WORLD * ROWS, SEQ + 1), generator=g)
    pos = torch.cat([torch.arange(5), torch.arange(SEQ - 5)]).expand(WORLD * ROWS, SEQ)  # packed documents
    return ids[:, :-1], ids[:, 1:], pos


def _step(model, rows: slice):
    """Loss (LM + aux) of the batch rows, its aux loss and loads, after backward."""
    from pretrain.train.trainer import lm_loss

    inputs, labels, pos = (t[rows] for t in _batch())
    logits, aux = model(inputs, position_ids=pos, return_aux=True)
    loss = lm_loss(logits, labels) + aux["aux_loss"]
    loss.backward()
    loads = {k: v.clone() for k, v in aux.items() if k.startswith("metric/moe_load.")}
    return loss.detach(), aux["aux_loss"].detach(), loads


def _rank_main(rank: int, world: int, store: str, out_dir: str) -> None:
    from parallel.expert import apply_expert_parallel, expert_param_names

    torch.set_num_threads(1)
    dist.init_process_group("gloo", store=dist.FileStore(store, world), rank=rank, world_size=world)
    out = {}
    for case in CASES:
        model = _model(case)
        sharded = apply_expert_parallel(model, dist.group.WORLD)
        loss, aux, loads = _step(model, slice(rank * ROWS, (rank + 1) * ROWS))
        experts, grads = expert_param_names(model), {}
        for name, p in model.named_parameters():
            if name not in experts:  # data parallelism: the mean over ranks
                dist.all_reduce(p.grad)
                p.grad /= world
            grads[name] = p.grad
        out[case] = {"loss": loss, "aux": aux, "loads": loads, "grads": grads, "sharded": sharded}
    torch.save(out, f"{out_dir}/rank{rank}.pt")
    end_spawned_rank()


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


@pytest.fixture(scope="module")
def ranks(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("ep")
    mp.start_processes(_rank_main, args=(WORLD, str(tmp / "store"), str(tmp)), nprocs=WORLD, start_method="spawn")
    return [torch.load(tmp / f"rank{r}.pt") for r in range(WORLD)]


@pytest.mark.parametrize("case", sorted(CASES))
def test_expert_parallel_equals_one_process(ranks, case):
    torch.set_num_threads(1)
    model = _model(case)
    loss, aux, loads = _step(model, slice(0, WORLD * ROWS))
    got = [r[case] for r in ranks]
    assert sorted(got[0]["sharded"]) == sorted(
        n for n, _ in model.named_parameters() if n.rsplit(".", 1)[-1] in ("w1", "w3", "w2") and ".ffn." in n
    ) and got[0]["sharded"]
    assert _rel(sum(g["loss"] for g in got) / WORLD, loss) <= 1e-5
    assert _rel(sum(g["aux"] for g in got) / WORLD, aux) <= 1e-5
    assert sorted(loads) == sorted(got[0]["loads"]) and loads
    if case == "rmoe":  # the docstring's claim: some layer sends no row to rank 0's experts
        assert any(v[: v.numel() // WORLD].sum() == 0 for v in loads.values())
    for g in got:  # the global load, logged alike on every rank
        for k, v in loads.items():
            torch.testing.assert_close(g["loads"][k], v, rtol=0, atol=1e-7)
    for name, p in model.named_parameters():
        if name in got[0]["sharded"]:
            mine = torch.cat([g["grads"][name] for g in got])  # experts in rank order
        else:
            mine = got[0]["grads"][name]
            torch.testing.assert_close(got[1]["grads"][name], mine, rtol=0, atol=0)
        assert mine.shape == p.grad.shape, name
        assert _rel(mine, p.grad) <= 1e-5, f"{case} {name}: relative error {_rel(mine, p.grad):.2e}"


def test_ep_must_divide_the_experts():
    with pytest.raises(ConfigError, match=r"^parallel\.ep: 3 does not divide model\.moe\.n_experts=8$"):
        load_config("configs/rmoe_tiny.toml", ["parallel.ep=3"])
    with pytest.raises(ConfigError, match=r"^parallel\.ep: 2 needs MoE layers"):
        load_config("configs/llama_tiny.toml", ["parallel.ep=2"])
    assert load_config("configs/rmoe_tiny.toml", ["parallel.ep=4"]).parallel.ep == 4


def _rank_main_dp4(rank: int, world: int, store: str, out_dir: str) -> None:
    """Rank ``rank`` of dp_shard=4 x ep=2 (two ep groups, {0, 1} and {2, 3}), one sequence each,
    as the Trainer lays it out: experts as DTensors (parallelize_experts), their gradients
    averaged over the two groups (average_expert_grads), the others over all four ranks."""
    from parallel.dims import ParallelDims
    from parallel.expert import average_expert_grads, parallelize_experts
    from parallel.grad_norm import clip_grad_norm_

    torch.set_num_threads(1)
    dist.init_process_group("gloo", store=dist.FileStore(store, world), rank=rank, world_size=world)
    mesh = ParallelDims(dp_replicate=1, dp_shard=world, world_size=world, ep=2).build_ep_mesh("cpu")
    model = _model("rmoe")
    experts = parallelize_experts(model, mesh)
    _step(model, slice(rank, rank + 1))
    for p in model.parameters():
        if all(p is not e for e in experts):
            dist.all_reduce(p.grad)
            p.grad /= world
    average_expert_grads(experts)
    # the non-expert gradients are whole on every rank here (FSDP2 shards them in the Trainer):
    # counted on rank 0 only; the expert DTensors count themselves once
    others = [p.grad for p in model.parameters() if rank > 0 and not isinstance(p.grad, DTensor)]
    norm = clip_grad_norm_([p.grad for p in model.parameters()], float("inf"), skip=others)
    grads = {n: p.grad.to_local() if isinstance(p.grad, DTensor) else p.grad for n, p in model.named_parameters()}
    shapes = {n: tuple(p.shape) for n, p in model.named_parameters()}
    torch.save({"norm": norm, "grads": grads, "shapes": shapes}, f"{out_dir}/dp4_rank{rank}.pt")
    end_spawned_rank()


def test_experts_replicated_over_dp_shard_mod_ep(tmp_path):
    """dp = 4 > ep = 2: the gradients and the global norm equal one process accumulating the two
    ep groups' batches as two micro-batches (each group's balance loss uses its own global load)."""
    world = 4
    mp.start_processes(_rank_main_dp4, args=(world, str(tmp_path / "store"), str(tmp_path)), nprocs=world,
                       start_method="spawn")
    got = [torch.load(tmp_path / f"dp4_rank{r}.pt") for r in range(world)]
    torch.set_num_threads(1)
    from pretrain.train.trainer import lm_loss

    model = _model("rmoe")
    for group in (slice(0, 2), slice(2, 4)):
        inputs, labels, pos = (t[group] for t in _batch())
        logits, aux = model(inputs, position_ids=pos, return_aux=True)
        ((lm_loss(logits, labels) + aux["aux_loss"]) / 2).backward()
    want_norm = torch.sqrt(sum(p.grad.square().sum() for p in model.parameters()))
    for g in got:
        assert _rel(g["norm"], want_norm) <= 1e-5, (g["norm"], want_norm)
    for name, p in model.named_parameters():
        assert got[0]["shapes"][name] == tuple(p.shape), name  # DTensors of the global shape
        mine = got[0]["grads"][name]
        if mine.shape != p.grad.shape:  # an expert shard: ranks 0, 1 hold the two halves
            mine = torch.cat([got[0]["grads"][name], got[1]["grads"][name]])
            torch.testing.assert_close(got[2]["grads"][name], got[0]["grads"][name], rtol=0, atol=0)
        assert _rel(mine, p.grad) <= 1e-5, f"{name}: relative error {_rel(mine, p.grad):.2e}"
