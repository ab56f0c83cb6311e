"""The communication pattern of tensor (and sequence) parallelism at tp 2 on CPU/gloo: every
collective of one forward and backward, per region, equals what the plans imply
(bench/tensor_parallel.py: the measurement with CommDebugMode and the theory derived from the
plans). A border operator, partial sum or gradient all-reduce added, lost or resized fails here.
One process group for all cases."""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from tests.conftest import end_spawned_rank

BATCH, SEQ, TP = 2, 8, 2
# one model ("mix": one spawn, one build): Mamba-1's x_proj partial sums with an MoE FFN,
# Mamba-2 with one B/C group (GroupSlice, the gated norm spanning ranks) with an MoE FFN reading
# the running balance sum, Titans 'mal' (the memory's summed reads) with an MLP, SWA alone
CASES = ["mix"]


def _rank_main(rank: int, world: int, store: str, out: str) -> None:
    from torch.distributed.device_mesh import init_device_mesh

    from bench.tensor_parallel import measure_all

    torch.set_num_threads(1)
    dist.init_process_group("gloo", store=dist.FileStore(store, world), rank=rank, world_size=world)
    mesh = init_device_mesh("cpu", (world,), mesh_dim_names=("tp",))
    logs = measure_all(CASES, mesh, BATCH, SEQ)
    if rank == 0:
        torch.save(logs, out)
    end_spawned_rank()


def test_collectives_equal_the_plans(tmp_path):
    from bench.tensor_parallel import compare_all

    out = str(tmp_path / "logs.pt")
    mp.start_processes(_rank_main, args=(TP, str(tmp_path / "store"), out), nprocs=TP, start_method="spawn")
    rows = compare_all(torch.load(out), TP, BATCH, SEQ)
    assert {(r["case"], r["sp"]) for r in rows} == {(c, sp) for c in CASES for sp in (False, True)}
    kinds = set()
    for r in rows:
        what = f"{r['case']} sp={r['sp']} {r['label']}"
        assert r["m_fwd"] == r["t_fwd"], (what, "forward", r["m_fwd"], r["t_fwd"])
        assert r["m_bwd"] == r["t_bwd"], (what, "backward", r["m_bwd"], r["t_bwd"])
        kinds |= {k for k, _ in r["m_fwd"] + r["m_bwd"]}
    assert kinds == {"all_reduce", "all_gather", "reduce_scatter"}
