"""Tensor and sequence parallelism: plans as data (plan.py, plans*.py), applied by region.py."""

from parallel.tensor import plans  # noqa: F401  (registers the plans)
from parallel.tensor import plans_gla, plans_moe, plans_ssm, plans_titans  # noqa: F401
from parallel.tensor.plan import FFN_PLANS, MIXER_PLANS, GroupSlice, RegionPlan, register_plan

__all__ = ["FFN_PLANS", "MIXER_PLANS", "GroupSlice", "RegionPlan", "register_plan"]
