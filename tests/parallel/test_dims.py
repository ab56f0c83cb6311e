"""ParallelDims: pp x dp_replicate x dp_shard against the world size, and the batch relation
global = dp x micro x pp_microbatches x accumulation, with one-line errors naming the field."""

from __future__ import annotations

import pytest

from parallel.dims import ParallelDims
from pretrain.config import ConfigError, load_config


def _cfg(*overrides: str):
    return load_config("configs/tiny.toml", list(overrides))


@pytest.mark.parametrize(
    "overrides, world, grid",
    [
        ([], 1, (1, 1, 1)),
        ([], 4, (1, 1, 4)),  # without pp every rank is data-parallel, as before
        (["parallel.dp_replicate=2"], 4, (1, 2, 2)),
        (["parallel.pp=2"], 4, (2, 1, 2)),
        (["parallel.pp=2", "parallel.dp_replicate=2"], 8, (2, 2, 2)),
        (["parallel.pp=4", "parallel.dp_shard=1"], 4, (4, 1, 1)),
    ],
)
def test_degrees_cover_the_world(overrides, world, grid):
    dims = ParallelDims.from_config(_cfg(*overrides).parallel, world)
    assert (dims.pp, dims.dp_replicate, dims.dp_shard) == grid
    assert dims.pp * dims.dp == world


@pytest.mark.parametrize(
    "overrides, world, field",
    [
        (["parallel.pp=3"], 4, "parallel.pp"),
        (["parallel.pp=2", "parallel.dp_shard=2"], 2, "parallel.dp_shard"),
        (["parallel.pp=2", "parallel.dp_shard=1"], 4, "parallel.dp_shard"),
        (["parallel.pp=2", "parallel.dp_replicate=3"], 4, "parallel.dp_replicate"),
        (["parallel.dp_shard=2"], 4, "parallel.dp_shard"),
    ],
)
def test_pp_times_dp_must_equal_the_world(overrides, world, field):
    with pytest.raises(ConfigError) as err:
        ParallelDims.from_config(_cfg(*overrides).parallel, world)
    assert str(err.value).startswith(field + ":") and "\n" not in str(err.value)


@pytest.mark.parametrize(
    "overrides, world",
    [
        (["train.global_batch_size=16", "train.micro_batch_size=2"], 1),
        (["train.global_batch_size=16", "train.micro_batch_size=2"], 4),
        (["train.global_batch_size=16", "train.micro_batch_size=2", "parallel.pp=2"], 2),
        (["train.global_batch_size=48", "train.micro_batch_size=2", "parallel.pp=2"], 4),
        (["train.global_batch_size=24", "train.micro_batch_size=1", "parallel.pp=2", "parallel.pp_microbatches=3"], 4),
        (["train.global_batch_size=32", "train.micro_batch_size=1", "parallel.pp=2",
          "parallel.pp_schedule=interleaved_1f1b", "parallel.pp_virtual_stages=2"], 2),
    ],
)
def test_accumulation_covers_the_global_batch(overrides, world):
    cfg = _cfg(*overrides)
    dims = ParallelDims.from_config(cfg.parallel, world, cfg.train)
    t = cfg.train
    # count the sequences one step consumes: every data-parallel rank runs accum rounds of
    # pp_microbatches micro-batches (one micro-batch per round without pp)
    per_round = cfg.parallel.pp_microbatches or cfg.parallel.pp * cfg.parallel.pp_virtual_stages
    per_round = per_round if cfg.parallel.pp > 1 else 1
    accum = dims.grad_accum(t)
    assert dims.dp * accum * per_round * t.micro_batch_size == t.global_batch_size
    assert f"{t.global_batch_size} sequences per step" in dims.describe_batch(t)
    assert f"{accum} accumulation step(s)" in dims.describe_batch(t)


@pytest.mark.parametrize(
    "overrides, world",
    [
        (["train.global_batch_size=8", "train.micro_batch_size=4"], 4),  # 8 % (4 x 4)
        (["train.global_batch_size=8", "train.micro_batch_size=2", "parallel.pp=2", "parallel.pp_microbatches=4"], 4),
        (["train.global_batch_size=8", "train.micro_batch_size=8", "parallel.pp=2"], 2),  # 8 % (8 x 2)
    ],
)
def test_batch_that_does_not_divide_is_refused(overrides, world):
    cfg = _cfg(*overrides)
    with pytest.raises(ConfigError) as err:
        ParallelDims.from_config(cfg.parallel, world, cfg.train)
    assert str(err.value).startswith("train.global_batch_size:") and "\n" not in str(err.value)
    # without the training section only the layout is checked
    assert ParallelDims.from_config(cfg.parallel, world).world_size == world


@pytest.mark.parametrize("rank", [0, 5])
def test_mesh_puts_pp_outermost(rank):
    """One process stands for rank ``rank`` of 8 (torch's fake process group: no traffic)."""
    import torch.distributed as dist
    from torch.testing._internal.distributed.fake_pg import FakeStore

    dist.init_process_group("fake", store=FakeStore(), rank=rank, world_size=8)
    try:
        dims = ParallelDims.from_config(_cfg("parallel.pp=2", "parallel.dp_replicate=2").parallel, 8)
        mesh = dims.build_mesh("cpu")
        assert mesh.mesh_dim_names == ("pp", "dp_replicate", "dp_shard")
        # row-major over (pp, dp_replicate, dp_shard): the ranks of one stage are contiguous
        assert tuple(mesh.get_coordinate()) == (rank // 4, rank // 2 % 2, rank % 2)
        assert mesh["dp_replicate", "dp_shard"].mesh.flatten().tolist() == list(range(rank // 4 * 4, rank // 4 * 4 + 4))
        flat = ParallelDims.from_config(_cfg().parallel, 8).build_mesh("cpu")  # dp only: as before pp
        assert flat.mesh_dim_names == ("dp_replicate", "dp_shard") and flat["dp_shard"].size() == 8
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize(
    "overrides, world, grid, names",
    [
        (["parallel.tp=2"], 2, (1, 1, 1, 2), ("dp_replicate", "dp_shard", "tp")),
        (["parallel.tp=2"], 8, (1, 1, 4, 2), ("dp_replicate", "dp_shard", "tp")),
        (["parallel.tp=2", "parallel.pp=2"], 8, (2, 1, 2, 2), ("pp", "dp_replicate", "dp_shard", "tp")),
        (["parallel.tp=4", "parallel.dp_replicate=2"], 8, (1, 2, 1, 4), ("dp_replicate", "dp_shard", "tp")),
    ],
)
def test_tp_is_the_innermost_dimension(overrides, world, grid, names):
    cfg = load_config("configs/llama_tiny.toml", overrides)
    dims = ParallelDims.from_config(cfg.parallel, world)
    assert (dims.pp, dims.dp_replicate, dims.dp_shard, dims.tp) == grid
    assert dims.sequence_parallel  # on by default with tp > 1
    # ranks are laid out pp, dp_replicate, dp_shard, tp (row-major): tensor-parallel peers are
    # consecutive ranks and read the same data
    expected = [(r // dims.tp) % dims.dp for r in range(world)]
    assert [dims.dp_rank(r) for r in range(world)] == expected
    assert all(dims.dp_rank(r) == dims.dp_rank(r - r % dims.tp) for r in range(world))
    # mesh dimension names follow the grid (only the > 1 pp/tp dimensions are kept)
    kept = [n for n, size in zip(("pp", "dp_replicate", "dp_shard", "tp"), grid) if n.startswith("dp") or size > 1]
    assert tuple(kept) == names


@pytest.mark.parametrize(
    "overrides, field",
    [
        (["parallel.tp=3", "data.seq_len=255"], "model.attention.n_heads"),  # 8 heads
        (["parallel.tp=2", "data.seq_len=255"], "data.seq_len"),  # sequence parallel splits T
        (["parallel.tp=0"], "parallel.tp"),
    ],
)
def test_impossible_tp_is_one_line_naming_the_field(overrides, field):
    with pytest.raises(ConfigError) as err:
        load_config("configs/llama_tiny.toml", overrides)
    assert str(err.value).startswith(field + ":") and "\n" not in str(err.value)


def test_tp_must_divide_the_world():
    cfg = load_config("configs/llama_tiny.toml", ["parallel.tp=4"])
    with pytest.raises(ConfigError, match="^parallel.tp:"):
        ParallelDims.from_config(cfg.parallel, 6)


def test_cp_sits_between_dp_and_tp():
    """Rank grid (dp_shard, cp, tp) row-major: cp peers of a data-parallel rank read the same
    batch; the mesh has a 'cp' dimension, and FSDP's mesh flattens dp_shard x cp."""
    import torch.distributed as dist
    from torch.testing._internal.distributed.fake_pg import FakeStore

    from parallel.data import fsdp_mesh

    cfg = load_config("configs/llama_tiny.toml", ["parallel.tp=2", "parallel.cp=2", "data.seq_len=64", "train.micro_batch_size=4"])
    dims = ParallelDims.from_config(cfg.parallel, 8, cfg.train)
    assert (dims.dp_shard, dims.cp, dims.tp) == (2, 2, 2)
    assert [dims.dp_rank(r) for r in range(8)] == [0, 0, 0, 0, 1, 1, 1, 1]
    assert [dims.cp_rank(r) for r in range(8)] == [0, 0, 1, 1, 0, 0, 1, 1]
    assert "2 context-parallel ranks" in dims.describe_batch(cfg.train)
    dist.init_process_group("fake", store=FakeStore(), rank=5, world_size=8)
    try:
        mesh = dims.build_mesh("cpu")
        assert mesh.mesh_dim_names == ("dp_replicate", "dp_shard", "cp", "tp")
        assert mesh["cp"].mesh.tolist() == [5, 7] and mesh["tp"].mesh.tolist() == [4, 5]
        assert fsdp_mesh(mesh, dims).mesh.tolist() == [1, 3, 5, 7]
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize(
    "config, overrides, field, match",
    [
        ("llama_tiny", ["parallel.cp=2", "data.seq_len=66"], "data.seq_len", "4 context-parallel segments"),
        ("gla_tiny", ["parallel.cp=4", "data.seq_len=66"], "data.seq_len", "into 4 context"),  # no full attention
        ("llama_tiny", ["parallel.cp=2", "parallel.cp_load_balance=false", "data.seq_len=65"], "data.seq_len", "into 2"),
        ("llama_tiny", ["parallel.cp=2", "parallel.tp=4", "data.seq_len=72"], "data.seq_len", "parallel.tp=4"),
        ("llama_tiny", ["parallel.cp=2", "model.attention.backend='flash'"], "model.attention.backend", "flash"),
        ("llama_tiny", ["parallel.cp=2", "parallel.dp_backend='deepspeed'"], "parallel.cp", "fsdp"),
        ("llama_tiny", ["parallel.cp=0"], "parallel.cp", ">= 1"),
        ("llama_tiny", ["parallel.cp_load_balance='yes'"], "parallel.cp_load_balance", "yes"),
        ("llama_tiny", ["parallel.cp_load_balance=1"], "parallel.cp_load_balance", "got 1"),  # 1 == True
    ],
)
def test_impossible_cp_is_one_line_naming_the_field(config, overrides, field, match):
    with pytest.raises(ConfigError) as err:
        load_config(f"configs/{config}.toml", overrides)
    assert str(err.value).startswith(field + ":") and "\n" not in str(err.value)
    assert match in str(err.value)


def test_cp_must_divide_the_world():
    cfg = load_config("configs/llama_tiny.toml", ["parallel.cp=4", "data.seq_len=64"])
    with pytest.raises(ConfigError, match="^parallel.cp:"):
        ParallelDims.from_config(cfg.parallel, 6)
