"""The ``scatter_partial`` hook of parallel/tensor/region.py (protocol: RegionPlan.scatter_partials
in parallel/tensor/plan.py) on 4 gloo ranks, for a span of all 4 (the tp mesh) and of 2 (rank
pairs, sub-groups): its forward is the rank's chunk of its block's sum, its backward gives every
partial the whole gradient (the block's chunk gradients side by side), both against sums and
concatenations written out here."""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from tests.conftest import end_spawned_rank

WORLD, SHAPE = 4, (2, 3, 8)


def _partial(rank: int) -> torch.Tensor:
    return torch.randn(SHAPE, dtype=torch.float64, generator=torch.Generator().manual_seed(rank))


def _upstream(rank: int, width: int) -> torch.Tensor:
    """The gradient rank ``rank`` feeds back into its chunk."""
    return torch.randn(*SHAPE[:-1], width, dtype=torch.float64, generator=torch.Generator().manual_seed(100 + rank))


def _rank_main(rank: int, world: int, store: str, out_dir: str) -> None:
    from torch.distributed.device_mesh import init_device_mesh

    from parallel.tensor.region import _scatter_partial, _span_groups

    torch.set_num_threads(1)
    dist.init_process_group("gloo", store=dist.FileStore(store, world), rank=rank, world_size=world)
    mesh = init_device_mesh("cpu", (world,), mesh_dim_names=("tp",))
    groups = _span_groups(mesh)
    results = {}
    for span in (WORLD, 2):
        t = _partial(rank).requires_grad_()
        chunk = _scatter_partial(mesh, groups[span])(t)
        (chunk * _upstream(rank, chunk.shape[-1])).sum().backward()
        results[span] = (chunk.detach(), t.grad)
    torch.save(results, f"{out_dir}/rank{rank}.pt")
    end_spawned_rank()


def test_scatter_partial_is_a_reduce_scatter_with_all_gather_backward(tmp_path):
    mp.start_processes(_rank_main, args=(WORLD, str(tmp_path / "store"), str(tmp_path)), nprocs=WORLD,
                       start_method="spawn")
    got = [torch.load(tmp_path / f"rank{r}.pt") for r in range(WORLD)]
    for span in (WORLD, 2):
        width = SHAPE[-1] // span
        for r in range(WORLD):
            block = range(r // span * span, r // span * span + span)
            total = sum(_partial(s) for s in block)
            i = r % span
            chunk, grad = got[r][span]
            torch.testing.assert_close(chunk, total[..., i * width : (i + 1) * width], rtol=0, atol=1e-12)
            whole = torch.cat([_upstream(s, width) for s in block], dim=-1)
            torch.testing.assert_close(grad, whole, rtol=0, atol=0, msg=f"span {span} rank {r}: gradient")
