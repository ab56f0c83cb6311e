"""`pretrain plan`: what a config builds, what it costs per token, memory per device, and with
parallel.pp > 1 the pipeline split (layers, parameters, FLOPs and activations per stage)."""

from __future__ import annotations

from collections import Counter

from pretrain.config import Config, ConfigError
from pretrain.models import count_parameters, flops_per_token, memory_estimate


def _human(n: float, unit: str = "") -> str:
    for scale, suffix in ((1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(n) >= scale:
            return f"{n / scale:.2f}{suffix}{unit}"
    return f"{n:.0f}{unit}"


def _pattern_summary(pattern: list[tuple[str, str]]) -> str:
    """Run-length form of the block list, e.g. '4 x [mamba+mlp, swa+mlp]'."""
    names = [f"{m}+{f}" if f != "none" else m for m, f in pattern]
    for period in range(1, len(names)):
        if len(names) % period == 0 and names == names[:period] * (len(names) // period):
            return f"{len(names) // period} x [{', '.join(names[:period])}]"
    return ", ".join(names)


def format_plan(cfg: Config, dp: int = 1) -> str:
    """The plan of ``cfg`` as text; ``dp``: data-parallel ranks to estimate memory and the
    batch relation for (the world size is parallel.pp x dp x parallel.cp x parallel.tp)."""
    model_cfg = cfg.with_vocab().model
    pattern = model_cfg.pattern()
    params = count_parameters(model_cfg)
    flops = flops_per_token(model_cfg, cfg.data.seq_len)
    p = cfg.parallel
    mem = memory_estimate(model_cfg, cfg.train.micro_batch_size, cfg.data.seq_len, dp=dp, tp=p.tp, sp=p.sp, cp=p.cp,
                         cp_attention=p.cp_attention)
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
    tp = f", tp={p.tp}{' with sequence parallelism' if p.sp else ''}" if p.tp > 1 else ""
    tp += f", cp={p.cp}" if p.cp > 1 else ""
    lines.append(f"memory per device (dp={dp}{tp}, micro-batch {cfg.train.micro_batch_size}, fp32 master weights)")
    for key, value in mem.items():
        if isinstance(value, dict):
            for sub, v in value.items():
                lines.append(f"    {sub:<20}{v / 2**30:>13.3f} GiB")
        else:
            lines.append(f"  {key:<22}{value / 2**30:>13.3f} GiB")
    if p.tp > 1:
        lines += format_tp(model_cfg, p.tp, p.ep)
    if p.cp > 1:
        from parallel.context import format_cp

        lines += format_cp(cfg)
    if cfg.parallel.pp > 1 or cfg.parallel.pp_virtual_stages > 1:
        lines += format_split(cfg)
    lines.append(_batch_line(cfg, dp))
    return "\n".join(lines)


def format_tp(model_cfg, tp: int, ep: int = 1) -> list[str]:
    """One line per layer type under tensor parallelism: what its plan splits, and what it
    keeps whole on every rank (KV heads or B/C groups fewer than the ranks, Megatron's way;
    with expert parallelism ``ep`` > 1, the experts, which are split over ep instead)."""
    from parallel.tensor.plan import GroupSlice
    from parallel.tensor.region import tp_plans

    import torch

    from pretrain.models import build_model

    with torch.device("meta"):
        model = build_model(model_cfg)
    lines, seen = [], set()
    for block, plans in zip(model.blocks.values(), tp_plans(model_cfg, tp, ep)):
        for name, module, plan in zip((block.mixer_name, block.ffn_name), (block.mixer, block.ffn), plans):
            if plan is None or name in seen:
                continue
            seen.add(name)
            layouts = {n: plan.layout(n) for n, _ in module.named_parameters()}
            shared = [f"{n} (each of {g.groups} groups on {tp // g.groups} ranks)"
                      for n, g in layouts.items() if isinstance(g, GroupSlice)]
            sums = [f"partial sums in {k or 'the layer'} over {span} ranks" for k, span in plan.partial_sums.items()]
            sums += [f"reduce-scatter in {k or 'the layer'} over {span} ranks" for k, span in plan.scatter_partials.items()]
            split = sum(1 for g in layouts.values() if g is not None and not isinstance(g, GroupSlice))
            whole = sum(1 for g in layouts.values() if g is None)
            note = f"{split} parameters split, {whole} whole" + "".join(f"; replicated: {x}" for x in shared)
            note += "".join(f"; {x}" for x in sums)
            lines.append(f"tensor      {name:<10} {note}")
    return lines


def format_split(cfg: Config) -> list[str]:
    """The pipeline stages: one line each (layers '3-6.mixer': blocks 3 to 6, of block 6 only its
    mixer half; '7.ffn-9': from block 7's FFN half), then the imbalance and the parameters held
    twice."""
    from parallel.pipeline.split import plan_split

    p, model_cfg = cfg.parallel, cfg.with_vocab().model
    split = plan_split(model_cfg, p, cfg.data.seq_len, cfg.train.micro_batch_size)
    how = "given by parallel.pp_split" if not split.automatic else "balanced by training FLOPs per token"
    pattern = model_cfg.pattern()
    lines = [
        f"pipeline    pp {p.pp} x {p.pp_virtual_stages} stage(s) per rank, schedule {p.pp_schedule}, "
        f"{p.microbatches} micro-batches per round; cuts {list(split.cuts)} ({how})",
        f"  {'stage':>5} {'rank':>4}  {'layers':<16}{'params':>14}{'FLOPs/token':>14}{'act/micro-batch':>17}  blocks",
    ]
    for s in split.stages:
        blocks = _pattern_summary(pattern[s.layers.start : s.layers.stop])
        extras = (["embed"] if s.index == 0 else []) + (["head"] if s.index == len(split.stages) - 1 else [])
        lines.append(
            f"  {s.index:>5} {s.rank:>4}  {s.span:<16}{s.params:>14,}{_human(s.flops_per_token, 'FLOP'):>14}"
            f"{s.activation_bytes / 2**30:>13.3f} GiB  {', '.join([*extras, blocks])}"
        )
    rank = f"; per rank {split.rank_imbalance:.3f}" if p.pp_virtual_stages > 1 else ""
    lines.append(f"imbalance   {split.imbalance:.3f} (max / mean stage FLOPs per token){rank}")
    for name, (numel, stages) in split.shared.items():
        lines.append(f"shared      {name}: {numel:,} parameters, counted on stage {stages[0]}, "
                     f"copies on stage(s) {', '.join(map(str, stages[1:]))}")
    return lines


def _batch_line(cfg: Config, dp: int) -> str:
    from parallel.dims import ParallelDims

    try:
        p = cfg.parallel
        dims = ParallelDims.from_config(p, p.pp * dp * p.cp * p.tp, cfg.train)
    except ConfigError as exc:  # plan describes what would be refused rather than refusing
        return f"batch       not runnable with dp={dp}: {exc}"
    return f"batch       {dims.describe_batch(cfg.train).removeprefix('batch: ')}"
