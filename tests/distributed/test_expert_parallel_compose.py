"""Expert parallelism composed with tensor and pipeline parallelism, on gloo ranks, against
one process, for the RMoE and softmax-router 'moe' models of test_expert_parallel.py:

- tp2 x ep2 (dp_shard=2, sequence parallel): the experts sharded over the two ranks of each
  tp coordinate and whole on both tp ranks, each tp rank dispatching its half of the rows
  (parallel/tensor/plans_moe.py). The loss, aux loss, logged loads, every gradient (gathered
  from the tp and ep shards) and the global norm equal one process running both data-parallel
  ranks' sequences as one batch;
- pp2 x ep2 (dp_shard=2 in each stage, FSDP2 ignoring the experts, GPipe over 2 micro-batches):
  each stage's MoE layers dispatch over the stage's two data-parallel ranks. The losses, every
  gradient and the global norm equal one process accumulating, per micro-batch index, the two
  ranks' micro-batches as one batch (an ep group's balance loss uses the load of its ranks'
  current micro-batches, parallel/expert.py);
- pp2 x tp2 x ep2 (eight ranks, RMoE): both at once, an ep group per stage and tp coordinate.

float32, relative error <= 1e-5. One process group of four ranks for the first two layouts and
both models."""

from __future__ import annotations


import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch.distributed.tensor import DTensor

from tests.conftest import end_spawned_rank
from tests.distributed.test_expert_parallel import CASES, ROWS, SEED, _batch, _model, _rel, _step

WORLD = 4
CUTS = {"rmoe": [0, 2], "moe": [0, 1]}  # 3 and 2 blocks: MoE layers on both stages


def _full(g: torch.Tensor) -> torch.Tensor:
    return g.full_tensor() if isinstance(g, DTensor) else g


def _tp_ep(case: str, rank: int) -> dict:
    """This rank's share of the tp2 x ep2 step of ``case``."""
    from parallel.dims import ParallelDims
    from parallel.expert import average_expert_grads, parallelize_experts
    from parallel.grad_norm import clip_grad_norm_
    from parallel.tensor.region import apply_tp

    dims = ParallelDims(dp_replicate=1, dp_shard=2, world_size=WORLD, tp=2, sequence_parallel=True, ep=2)
    mesh = dims.build_mesh("cpu")
    tp_mesh = mesh["tp"]
    model = _model(case)
    apply_tp(model, tp_mesh, True, ep=2)
    experts = parallelize_experts(model, dims.build_ep_mesh("cpu"))
    dp = dims.dp_rank(rank)
    inputs, labels, pos = (t[dp * ROWS : (dp + 1) * ROWS] for t in _batch())
    loss, aux = model(inputs, position_ids=pos, labels=labels, return_aux=True)
    loss = loss + aux["aux_loss"]
    loss.backward()
    expert_ids = {id(p) for p in experts}
    others = [p for p in model.parameters() if id(p) not in expert_ids]
    for p in others:  # data parallelism over dp_shard (FSDP2 in the Trainer)
        g = p.grad.to_local()
        dist.all_reduce(g, group=mesh["dp_shard"].get_group())
        g /= dims.dp
    average_expert_grads(experts)
    # the non-expert gradients are whole on each data-parallel rank: counted on dp rank 0 only
    skip = [p.grad for p in others] if dp > 0 else []
    norm = clip_grad_norm_([p.grad for p in model.parameters()], float("inf"), skip=skip)
    loads = {k: v.clone() for k, v in aux.items() if k.startswith("metric/moe_load.")}
    return {
        "loss": loss.detach(), "aux": aux["aux_loss"].detach(), "loads": loads, "norm": norm,
        "grads": {n: _full(p.grad) for n, p in model.named_parameters()},
        "placements": {n: tuple(map(str, p.placements)) for n, p in model.named_parameters() if id(p) in expert_ids},
    }


def _pp_ep(case: str, rank: int, tp: int = 1) -> dict:
    """This rank's share of the pp2 x ep2 (x tp) GPipe step of ``case``."""
    from parallel.data import apply_fsdp
    from parallel.dims import ParallelDims
    from parallel.expert import average_expert_grads, parallelize_experts
    from parallel.pipeline.schedule import PipelineLoss, build_schedule, pipeline_stage, stage_ranks, step
    from parallel.pipeline.stage import SharedParamSync, build_stage, clip_grad_norm_, shared_holders
    from parallel.tensor.region import apply_tp

    dims = ParallelDims(dp_replicate=1, dp_shard=2, world_size=4 * tp, pp=2, pp_microbatches=ROWS, tp=tp,
                        sequence_parallel=tp > 1, ep=2)
    mesh = dims.build_mesh("cpu")
    pp_rank = mesh["pp"].get_local_rank()
    cfg = _model(case).cfg
    cuts = CUTS[case]
    stage = build_stage(cfg, cuts, pp_rank, SEED)
    if tp > 1:
        apply_tp(stage.model, mesh["tp"], True, ep=2)
    experts = parallelize_experts(stage.model, dims.build_ep_mesh("cpu"))
    apply_fsdp(stage, mesh["dp_shard"], ignored_params=set(experts))
    loss_fn = PipelineLoss(stage.out_keys if stage.is_last else [], ROWS)
    sched = build_schedule("gpipe", [pipeline_stage(stage, torch.device("cpu"), group=mesh["pp"].get_group())],
                           ROWS, loss_fn)
    pipelines = mesh.mesh.reshape(2, -1).T.tolist()
    sync = SharedParamSync([stage], shared_holders(cfg, cuts, stage_ranks("gpipe", 2, 1)),
                           mesh["pp"].get_group(), pipelines)
    dp = dims.dp_rank(rank)
    inputs, labels, pos = (t[dp * ROWS : (dp + 1) * ROWS] for t in _batch())  # micro-batches of 1 row
    records = step(sched, loss_fn, inputs if stage.is_first else None, labels if stage.is_last else None, pos)
    sync.sync()
    average_expert_grads(experts)
    norm = clip_grad_norm_([stage], float("inf"))
    losses = [(r["lm_loss"] + r["aux_loss"]).item() for r in records]
    return {"losses": losses, "norm": norm, "grads": {n: _full(p.grad) for n, p in stage.model.named_parameters()}}


def _rank_main(rank: int, world: int, store: str, out_dir: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", store=dist.FileStore(store, world), rank=rank, world_size=world)
    out = {("tp", case): _tp_ep(case, rank) for case in CASES}
    out.update({("pp", case): _pp_ep(case, rank) for case in CASES})
    torch.save(out, f"{out_dir}/rank{rank}.pt")
    end_spawned_rank()


def _rank_main_8(rank: int, world: int, store: str, out_dir: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", store=dist.FileStore(store, world), rank=rank, world_size=world)
    torch.save(_pp_ep("rmoe", rank, tp=2), f"{out_dir}/rank{rank}.pt")
    end_spawned_rank()


@pytest.fixture(scope="module")
def ranks(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("ep_compose")
    mp.start_processes(_rank_main, args=(WORLD, str(tmp / "store"), str(tmp)), nprocs=WORLD, start_method="spawn")
    return [torch.load(tmp / f"rank{r}.pt") for r in range(WORLD)]


def _norm(model) -> torch.Tensor:
    return torch.sqrt(sum(p.grad.square().sum() for p in model.parameters()))


@pytest.mark.parametrize("case", sorted(CASES))
def test_tp2_x_ep2_equals_one_process(ranks, case):
    torch.set_num_threads(1)
    model = _model(case)
    loss, aux, loads = _step(model, slice(0, 2 * ROWS))  # one ep group: both dp ranks' rows
    got = [r["tp", case] for r in ranks]
    assert got[0]["placements"] and all(
        pl == ("R", "R", "S(0)", "R") for pl in got[0]["placements"].values()
    )
    for dp in (0, 1):  # tp peers hold the same loss; the two dp ranks' mean is the batch's
        torch.testing.assert_close(got[2 * dp]["loss"], got[2 * dp + 1]["loss"], rtol=0, atol=0)
    assert _rel((got[0]["loss"] + got[2]["loss"]) / 2, loss) <= 1e-5
    assert _rel((got[0]["aux"] + got[2]["aux"]) / 2, aux) <= 1e-5
    assert loads
    for g in got:
        for k, v in loads.items():
            torch.testing.assert_close(g["loads"][k], v, rtol=0, atol=1e-7)
        assert _rel(g["norm"], _norm(model)) <= 1e-5
        for name, p in model.named_parameters():
            assert _rel(g["grads"][name], p.grad) <= 1e-5, f"{case} {name}: {_rel(g['grads'][name], p.grad):.2e}"
    worst = max(_rel(g["grads"][n], p.grad) for g in got for n, p in model.named_parameters())
    print(f"tp2 x ep2 {case}: worst gradient relative error {worst:.1e}")


@pytest.mark.parametrize("case", sorted(CASES))
def test_pp2_x_ep2_equals_one_process(ranks, case):
    """Ranks 0, 1: stage 0 (dp ranks 0, 1); ranks 2, 3: stage 1."""
    _check_pipeline(case, [r["pp", case] for r in ranks], 1)


def test_pp2_x_tp2_x_ep2_equals_one_process(tmp_path):
    """Eight ranks: pp2 x dp_shard2 x tp2 (sequence parallel), ep2 in each stage and tp coordinate."""
    world = 8
    mp.start_processes(_rank_main_8, args=(world, str(tmp_path / "store"), str(tmp_path)), nprocs=world,
                       start_method="spawn")
    _check_pipeline("rmoe", [torch.load(tmp_path / f"rank{r}.pt") for r in range(world)], 2)


def _check_pipeline(case: str, got: list[dict], tp: int) -> None:
    """``got``: the ranks' :func:`_pp_ep` results, in global rank order (pp outermost)."""
    from pretrain.train.trainer import lm_loss

    torch.set_num_threads(1)
    model = _model(case)
    inputs, labels, pos = _batch()
    want = []
    for m in range(ROWS):  # micro-batch m of both dp ranks, as one batch
        rows = [m, ROWS + m]
        logits, aux = model(inputs[rows], position_ids=pos[rows], return_aux=True)
        loss = lm_loss(logits, labels[rows]) + aux["aux_loss"]
        (loss / ROWS).backward()
        want.append(loss.item())
    half = len(got) // 2  # ranks of stage 0, then of stage 1 (dp outer, tp inner)
    assert not any(g["losses"] for g in got[:half])
    for m in range(ROWS):  # the last stage's dp ranks: their mean is the micro-batch's loss
        mean = (got[half]["losses"][m] + got[half + tp]["losses"][m]) / 2
        assert abs(mean - want[m]) <= 1e-5 * abs(want[m]), (m, mean, want[m])
    grads = {}
    for g in got:
        assert _rel(g["norm"], _norm(model)) <= 1e-5
        for name, grad in g["grads"].items():
            grads.setdefault(name, []).append(grad)
    assert sorted(grads) == sorted(n for n, _ in model.named_parameters())
    for name, p in model.named_parameters():
        for grad in grads[name]:
            assert _rel(grad, p.grad) <= 1e-5, f"{case} {name}: {_rel(grad, p.grad):.2e}"
    worst = max(_rel(grad, p.grad) for n, p in model.named_parameters() for grad in grads[n])
    print(f"pp2 x ep2{' x tp2' if tp > 1 else ''} {case}: worst gradient relative error {worst:.1e}")
