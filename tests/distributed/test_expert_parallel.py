"""Expert parallelism (parallel/expert.py) on CPU/gloo against one process: two ranks, ep = 2,
each with its own micro-batch and half of every MoE layer's experts, for an RMoE model (GRU
router, 'global' balance loss) and a softmax-router 'moe' model ('per_layer' balance, z-loss,
shared expert). After each rank's backward, the non-expert gradients are averaged over the two
ranks (data parallelism) and the expert gradients left alone: the mean of the ranks' losses
(LM + auxiliary), the aux losses, the logged expert loads and every gradient must equal one
process running both micro-batches as one batch (float32, relative error <= 1e-5). At these
seeds the RMoE model's first layer routes no token to rank 0's experts, so the path of a rank
that receives no rows (which must still join the backward all-to-alls and give its experts zero
gradients) is exercised too."""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

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
