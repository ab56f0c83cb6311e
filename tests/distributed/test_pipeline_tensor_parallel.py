"""Pipeline x tensor parallelism (pp2 x tp2 on four gloo ranks, sequence parallel on) against a
single process, for every case of tests/distributed/test_pipeline.py (every family's tiny config,
SambaY's K/V and RMoE's router state crossing the cut, cuts inside blocks): the losses of two
steps, every gradient of the first (gathered from the tensor-parallel shards) and the clipped
global norms. One process group for all the cases."""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from tests.conftest import end_spawned_rank
from tests.distributed.test_pipeline import (
    BATCH, CASES, CLIP, LR, MICRO, SEED, _batch, _config, _grads_by_name, _reference, _rel,
)

SCHEDULES = [("gpipe", 1), ("interleaved_1f1b", 2)]


def _pipeline_tp(name: str, schedule: str, virtual: int, mesh) -> dict:
    """This rank's share of a pp2 x tp2 run of case ``name``: losses (last stage), first-step
    gradients as full tensors, clipped norms."""

    from parallel.pipeline.schedule import (
        PipelineLoss, build_schedule, pipeline_stage, stage_ranks, stages_of_rank, step,
    )
    from parallel.pipeline.stage import SharedParamSync, build_stage, clip_grad_norm_, shared_holders
    from parallel.tensor.region import apply_tp

    pp, tp_mesh = mesh["pp"], mesh["tp"]
    cfg, cuts = _config(name, 2 * virtual)
    local = [build_stage(cfg, cuts, s, SEED) for s in stages_of_rank(schedule, pp.get_local_rank(), 2, virtual)]
    for m in local:
        apply_tp(m.model, tp_mesh, True)
    stages = [pipeline_stage(m, torch.device("cpu"), group=pp.get_group()) for m in local]
    last = next((m for m in local if m.is_last), None)
    loss_fn = PipelineLoss(last.out_keys if last is not None else [], BATCH // MICRO)
    sched = build_schedule(schedule, stages, BATCH // MICRO, loss_fn)
    pipelines = mesh.mesh.reshape(2, -1).T.tolist()
    sync = SharedParamSync(local, shared_holders(cfg, cuts, stage_ranks(schedule, 2, virtual)), pp.get_group(), pipelines)
    opt = torch.optim.SGD([p for m in local for p in m.parameters()], lr=LR)
    inputs, labels, pos = _batch()
    ids = inputs if any(m.is_first for m in local) else None
    targets = labels if last is not None else None
    out: dict = {"losses": [], "grads": {}, "norms": []}
    for i in range(2):
        records = step(sched, loss_fn, ids, targets, pos)
        if records:
            out["losses"].append(sum((r["lm_loss"] + r.get("aux_loss", 0.0)).item() for r in records) / len(records))
        sync.sync()
        if i == 0:
            for m in local:
                for k, p in m.model.named_parameters():
                    out["grads"].setdefault(k, []).append(p.grad.full_tensor().clone())
        out["norms"].append(clip_grad_norm_(local, CLIP).item())  # over every rank: shards counted once
        opt.step()
        opt.zero_grad(set_to_none=True)
    return out


def _rank_main(rank: int, world: int, store: str, out_dir: str) -> None:
    from torch.distributed.device_mesh import init_device_mesh

    torch.set_num_threads(1)
    dist.init_process_group("gloo", store=dist.FileStore(store, world), rank=rank, world_size=world)
    mesh = init_device_mesh("cpu", (2, 2), mesh_dim_names=("pp", "tp"))
    results = {(name, s): _pipeline_tp(name, s, v, mesh) for name in CASES for s, v in SCHEDULES}
    torch.save(results, f"{out_dir}/rank{rank}.pt")
    end_spawned_rank()


def test_pipeline_x_tensor_parallel_equals_single_process(tmp_path):
    mp.start_processes(_rank_main, args=(4, str(tmp_path / "store"), str(tmp_path)), nprocs=4, start_method="spawn")
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(4)]
    for name in CASES:
        ref = _reference(name)
        for schedule, _ in SCHEDULES:
            parts = [r[name, schedule] for r in ranks]
            losses = [p["losses"] for p in parts if p["losses"]]
            assert len(losses) == 2, (name, schedule)  # the last stage's two tp ranks
            for got in losses:
                for a, b in zip(got, ref["losses"]):
                    assert abs(a - b) <= 1e-5 * abs(b), (name, schedule, a, b)
            grads = _grads_by_name(parts)
            assert sorted(grads) == sorted(ref["grads"]), (name, schedule)
            for k, want in ref["grads"].items():
                for got in grads[k]:
                    tol = 5e-5 if ".lambda_" in k else 1e-5  # see test_tensor_parallel.py
                    assert _rel(got, want) <= tol, (name, schedule, k, _rel(got, want))
            for part in parts:
                for a, b in zip(part["norms"], ref["norms"]):
                    assert abs(a - b) <= 1e-5 * b, (name, schedule, a, b)
