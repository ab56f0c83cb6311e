"""`pretrain plan` under context parallelism: the per-rank memory and the bytes each mixer
exchanges per layer, against the sizes worked out by hand."""

from __future__ import annotations

from parallel.context import cp_traffic
from pretrain.cli import main
from pretrain.config import load_config
from pretrain.models import memory_estimate


def test_traffic_of_each_mixer_type():
    """SambaY at T = 32K over cp 4 (load-balanced: 8 segments of 4K, 2 per rank), d_model 256,
    1 KV head of 64, window 128, Mamba d_inner 512 / N 16 / d_conv 4, fp32."""
    cfg = load_config("configs/sambay_d16.toml", [
        "model.d_model=256", "model.attention.n_heads=4", "model.attention.n_kv_heads=1",
        "model.attention.head_dim=64", "model.attention.window=128", "model.mamba.d_state=16",
    ]).model
    got = {mixer: nbytes for mixer, _, nbytes in cp_traffic(cfg, 1, 32768, 4, True)}
    others = 3 * 2  # rows of the 3 other ranks, 2 segments each
    assert got["attn_kv"] == others * 4096 * 2 * 64 * 4  # all-gathered keys and values
    assert got["swa"] == others * 127 * 2 * 64 * 4  # a window - 1 halo
    assert got["mamba"] == others * (3 * 512 * 4 + 2 * 512 * 16 * 4)  # conv halo + (decay, state)
    assert got["xattn"] == 0 and got["gmu"] == 0
    assert got["(baseline)"] == others * 4096 * 256 * 4
    longer = {m: b for m, _, b in cp_traffic(cfg, 1, 65536, 4, True)}
    assert longer["mamba"] == got["mamba"] and longer["attn_kv"] == 2 * got["attn_kv"]  # states do not grow


def test_memory_per_rank_and_plan_lines(capsys):
    cfg = load_config("configs/sambay_tiny.toml").with_vocab().model
    one = memory_estimate(cfg, 4, 1024)
    two = memory_estimate(cfg, 4, 1024, cp=2)
    local = sum(v for k, v in two["activations_by_type"].items() if k != "cp_gathered_kv")
    assert abs(local - one["activations"] / 2) < 1e-6 * one["activations"]
    a = cfg.attention
    n_full = sum(m == "attn_kv" for m, _ in cfg.pattern())
    kv = 2 * (a.n_kv_heads or a.n_heads) * (a.head_dim or cfg.d_model // a.n_heads)
    assert two["activations_by_type"]["cp_gathered_kv"] == n_full * kv * 4 * 512 * 4  # the other rank's 512 tokens
    assert abs(two["params"] - one["params"] / 2) < 1e-6 * one["params"]  # FSDP over dp x cp
    assert main(["plan", "configs/sambay_tiny.toml", "--set", "parallel.cp=2", "--set", "data.seq_len=1024"]) == 0
    out = capsys.readouterr().out
    assert "cp 2: each rank holds segments r and 3-r of 4 (256 tokens each)" in out
    assert "all-gathered keys/values" in out and "2 context-parallel ranks" in out
