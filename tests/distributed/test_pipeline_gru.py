"""RMoE's shared GRU router under pp2 x dp_shard2 (four ranks, gloo): every stage holds a copy
of ``router_gru`` sharded by FSDP2 over its data-parallel pair; after three AdamW steps on
different halves of the batch, the four full copies are bitwise equal (the copies' gradients
summed shard by shard, the replicas' averaged by FSDP) and equal to one process's GRU."""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from tests.conftest import end_spawned_rank
from tests.distributed.test_pipeline import BATCH, CLIP, SEED, _batch, _config

STEPS, LR = 3, 1e-2


def _reference() -> dict[str, torch.Tensor]:
    """One process, one row per micro-batch, the loss averaged over the batch."""
    from pretrain.models import build_model
    from pretrain.train.trainer import lm_loss

    cfg, _ = _config("rmoe_both_sides")
    torch.manual_seed(SEED)
    model = build_model(cfg)
    opt = torch.optim.AdamW(model.parameters(), lr=LR)
    inputs, labels, pos = _batch()
    for _ in range(STEPS):
        for row in range(BATCH):
            logits, aux = model(inputs[row : row + 1], position_ids=pos[row : row + 1], return_aux=True)
            ((lm_loss(logits, labels[row : row + 1]) + aux["aux_loss"]) / BATCH).backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), CLIP)
        opt.step()
        opt.zero_grad(set_to_none=True)
    return {k: p.detach().clone() for k, p in model.named_parameters() if k.startswith("router_gru.")}


def _rank_main(rank: int, world: int, store: str, out_dir: str) -> None:
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    from parallel.pipeline.schedule import PipelineLoss, build_schedule, pipeline_stage, stage_ranks, step
    from parallel.pipeline.stage import SharedParamSync, build_stage, clip_grad_norm_, shared_holders

    torch.set_num_threads(1)
    dist.init_process_group("gloo", store=dist.FileStore(store, world), rank=rank, world_size=world)
    pp, dp = 2, world // 2
    mesh = init_device_mesh("cpu", (pp, dp), mesh_dim_names=("pp", "dp_shard"))
    pp_rank, dp_rank = rank // dp, rank % dp  # pp outermost, as parallel.dims builds it
    cfg, cuts = _config("rmoe_both_sides")
    stage = build_stage(cfg, cuts, pp_rank, SEED)
    for block in stage.model.blocks.values():
        fully_shard(block, mesh=mesh["dp_shard"])
    fully_shard(stage, mesh=mesh["dp_shard"])
    n_micro = BATCH // dp  # one row per micro-batch
    loss_fn = PipelineLoss(stage.out_keys if stage.is_last else [], n_micro)
    sched = build_schedule("1f1b", [pipeline_stage(stage, torch.device("cpu"), mesh["pp"].get_group())],
                           n_micro, loss_fn)
    pipelines = mesh.mesh.reshape(pp, -1).T.tolist()
    sync = SharedParamSync([stage], shared_holders(cfg, cuts, stage_ranks("1f1b", pp)),
                           mesh["pp"].get_group(), pipelines)
    opt = torch.optim.AdamW(stage.parameters(), lr=LR)
    inputs, labels, pos = (t[dp_rank * n_micro : (dp_rank + 1) * n_micro] for t in _batch())
    for _ in range(STEPS):
        step(sched, loss_fn, inputs if stage.is_first else None, labels if stage.is_last else None, pos)
        sync.sync()
        clip_grad_norm_([stage], CLIP)
        opt.step()
        opt.zero_grad(set_to_none=True)
    gru = {k: p.full_tensor() for k, p in stage.model.named_parameters() if k.startswith("router_gru.")}
    torch.save(gru, f"{out_dir}/rank{rank}.pt")
    end_spawned_rank()


def test_gru_copies_stay_bitwise_equal_under_pp_x_dp(tmp_path):
    mp.start_processes(_rank_main, args=(4, str(tmp_path / "store"), str(tmp_path)), nprocs=4, start_method="spawn")
    copies = [torch.load(tmp_path / f"rank{r}.pt") for r in range(4)]
    want = _reference()
    assert sorted(copies[0]) == sorted(want) and len(want) == 4  # weight_ih/hh, bias_ih/hh
    for k, w in want.items():
        for rank, got in enumerate(copies):
            assert torch.equal(got[k], copies[0][k]), (rank, k)  # every copy, every replica
        torch.testing.assert_close(copies[0][k], w, rtol=1e-4, atol=1e-6, msg=k)
