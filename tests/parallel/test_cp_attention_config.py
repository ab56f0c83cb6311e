"""parallel.cp_attention: its check, where the model learns it, and what `pretrain plan` and the
memory estimate say of ring attention, against the sizes worked out by hand."""

from __future__ import annotations

import re

import pytest

from parallel.context import cp_traffic
from pretrain.cli import main
from pretrain.config import ConfigError, load_config
from pretrain.models import build_model, memory_estimate


def test_unknown_mode_is_one_line_naming_the_field():
    with pytest.raises(ConfigError) as err:
        load_config("configs/llama_tiny.toml", ["parallel.cp=2", "parallel.cp_attention='rings'"])
    assert str(err.value).startswith("parallel.cp_attention:") and "\n" not in str(err.value)
    assert "'rings'" in str(err.value)


def test_apply_context_parallel_gives_the_model_the_mode():
    import torch.distributed as dist
    from torch.testing._internal.distributed.fake_pg import FakeStore

    from parallel.context import apply_context_parallel

    cfg = load_config("configs/llama_tiny.toml").with_vocab().model
    model = build_model(cfg)
    dist.init_process_group("fake", store=FakeStore(), rank=1, world_size=2)
    try:
        assert apply_context_parallel(model, dist.group.WORLD, True, "ring") is model.sequence_split
        assert model.sequence_split.ring
        assert not apply_context_parallel(model, dist.group.WORLD, True).ring
        with pytest.raises(ValueError, match="'rings'"):
            apply_context_parallel(model, dist.group.WORLD, True, "rings")
    finally:
        dist.destroy_process_group()


def test_ring_traffic_and_memory():
    """SambaY(-DA) at T = 32K over cp 4 (8 segments of 4K, 2 per rank), 1 KV head of 64, fp32:
    a ring layer receives the other 3 ranks' keys/values in the forward (as much as the
    all-gather), and in the backward those again plus 4 fp32 blocks of their gradients; the
    cross-attention layers ring too; differential attention moves 1.5x (its two maps' keys,
    the shared values twice). The memory estimate keeps no gathered keys/values."""
    shapes = ["model.d_model=256", "model.attention.n_heads=4", "model.attention.n_kv_heads=2",
              "model.attention.head_dim=64"]
    others_kv = 3 * 2 * 4096 * 2 * 2 * 64 * 4  # rows of the 3 other ranks x tokens x K+V x 2 heads x 64 x fp32
    for config, factor in (("configs/sambay_d16.toml", 1.0), ("configs/sambay_da_d16.toml", 1.5)):
        cfg = load_config(config, shapes).model
        ring = {m: (what, b) for m, what, b in cp_traffic(cfg, 1, 32768, 4, True, attention="ring")}
        full = [m for m in ring if "attn_kv" in m or "xattn" in m]
        assert len(full) == 2
        for mixer in full:
            what, nbytes = ring[mixer]
            assert nbytes == factor * others_kv
            backward = factor * (others_kv + 4 * 2 * 4096 * 2 * 2 * 64 * 4)  # + cp blocks of this rank's size
            assert f"backward {backward / 2**20:.3f} MiB" in what
        gathered = {m: b for m, _, b in cp_traffic(cfg, 1, 32768, 4, True)}
        assert gathered[full[1]] == 0  # the all-gather's cross layers reuse the gathered keys/values
    cfg = load_config("configs/sambay_tiny.toml").with_vocab().model
    allgather = memory_estimate(cfg, 4, 1024, cp=2)["activations_by_type"]
    ring = memory_estimate(cfg, 4, 1024, cp=2, cp_attention="ring")["activations_by_type"]
    assert allgather["cp_gathered_kv"] > 0 and ring["cp_gathered_kv"] == 0
    assert {k: v for k, v in ring.items() if k != "cp_gathered_kv"} == {
        k: v for k, v in allgather.items() if k != "cp_gathered_kv"}


def test_plan_says_ring(capsys):
    """At 64K tokens the all-gather's kept keys/values show in the plan's memory; ring's are 0."""
    gathered = {}
    for mode in ("allgather", "ring"):
        assert main(["plan", "configs/sambay_tiny.toml", "--set", "parallel.cp=2", "--set", "data.seq_len=65536",
                     "--set", f"parallel.cp_attention='{mode}'"]) == 0
        out = capsys.readouterr().out
        assert f"full attention: {mode}" in out
        gathered[mode] = float(re.search(r"cp_gathered_kv +([0-9.]+) GiB", out).group(1))
    assert "ring: 1 K/V blocks" in out
    assert gathered["allgather"] > 0 and gathered["ring"] == 0
