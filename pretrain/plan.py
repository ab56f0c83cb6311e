"""`pretrain plan`: what a config builds, what it costs per token, and memory per device."""

from __future__ import annotations

from collections import Counter

from pretrain.config import Config
from pretrain.models import count_parameters, flops_per_token, memory_estimate


def _human(n: float, unit: str = "") -> str:
    for scale, suffix in ((1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(n) >= scale:
            return f"{n / scale:.2f}{suffix}{unit}"
    return f"{n:.0f}{unit}"


def _pattern_summary(pattern: list[tuple[str, str]]) -> str:
    """Run-length form of the block list, e.g. '4 x [mamba+mlp, swa+mlp]'."""
    names = [f"{m}+{f}" if f != "none" else m for m, f in pattern]
    for period in range(1, len(names) + 1):
        if len(names) % period == 0 and names == names[:period] * (len(names) // period):
            return f"{len(names) // period} x [{', '.join(names[:period])}]"
    return ", ".join(names)


def format_plan(cfg: Config, dp: int = 1) -> str:
    model_cfg = cfg.with_vocab().model
    pattern = model_cfg.pattern()
    params = count_parameters(model_cfg)
    flops = flops_per_token(model_cfg, cfg.data.seq_len)
    mem = memory_estimate(model_cfg, cfg.train.micro_batch_size, cfg.data.seq_len, dp=dp)
    counts = Counter(m for m, _ in pattern)
    lines = [
        f"model       {cfg.run.name}: {model_cfg.n_layers} blocks, d_model {model_cfg.d_model}, "
        f"vocab {model_cfg.vocab_size}, seq_len {cfg.data.seq_len}",
        f"pattern     {_pattern_summary(pattern)}",
        f"mixers      {', '.join(f'{n} x{c}' for n, c in counts.items())}",
        "parameters",
    ]
    for key, value in params.items():
        lines.append(f"  {key:<22}{value:>16,}  ({_human(value)})")
    lines.append("training FLOPs per token (forward + backward)")
    for key, value in flops.items():
        lines.append(f"  {key:<22}{_human(value, 'FLOP'):>16}")
    lines.append(f"memory per device (dp={dp}, micro-batch {cfg.train.micro_batch_size}, fp32 master weights)")
    for key, value in mem.items():
        if isinstance(value, dict):
            for sub, v in value.items():
                lines.append(f"    {sub:<20}{v / 2**30:>13.3f} GiB")
        else:
            lines.append(f"  {key:<22}{value / 2**30:>13.3f} GiB")
    return "\n".join(lines)
