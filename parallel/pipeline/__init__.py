"""Pipeline parallelism (torch.distributed.pipelining): the cost-balanced stage split, stage
modules whose inputs and outputs carry the cross-layer state, and the schedules built on them.
The trainer's use of them is pretrain/train/pipeline_step.py."""

from parallel.pipeline.schedule import (
    SCHEDULES,
    PipelineLoss,
    build_schedule,
    evaluate,
    pipeline_stage,
    stage_ranks,
    stages_of_rank,
    step,
)
from parallel.pipeline.split import PipelineSplit, Stage, balanced_cuts, plan_split, stage_cost
from parallel.pipeline.stage import (
    SHARED_PARAMS,
    SharedParamSync,
    StageModule,
    boundary_keys,
    build_stage,
    clip_grad_norm_,
    position_cut,
    shared_holders,
    stage_halves,
    stage_layers,
    stage_units,
)

__all__ = [
    "SCHEDULES", "SHARED_PARAMS", "PipelineLoss", "PipelineSplit", "SharedParamSync", "Stage", "StageModule",
    "balanced_cuts", "boundary_keys", "build_schedule", "build_stage", "clip_grad_norm_", "evaluate",
    "pipeline_stage", "plan_split", "position_cut", "shared_holders", "stage_cost", "stage_halves", "stage_layers",
    "stage_ranks", "stage_units", "stages_of_rank", "step",
]
