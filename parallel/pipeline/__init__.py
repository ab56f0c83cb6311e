"""Pipeline parallelism (torch.distributed.pipelining): the cost-balanced stage split, stage
modules whose inputs and outputs carry the cross-layer state, and the schedules built on them."""
