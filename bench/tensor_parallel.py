"""Communication volume of tensor (and sequence) parallelism, measured against the plans.

    python bench/tensor_parallel.py [--batch 2] [--seq 16]

Spawns 2 gloo processes on the CPU, applies tp=2 (parallel/tensor/region.py) to each family's
tiny config (shrunk) with and without sequence parallelism, and records every collective of
one forward (model + vocab-parallel cross-entropy) and one backward with a
``torch.distributed.tensor.debug.CommDebugMode`` extended to note each collective's kind and
bytes. That mode is a dispatch mode, so it sees both the DTensor redistributions (as
``_c10d_functional`` ops) and the raw ``torch.distributed`` calls of the partial sums
(``torch.distributed.all_reduce`` dispatches ``c10d.allreduce_``); every run checks
that it saw as many collectives as the tp process group's sequence number advanced by.

Each collective is attributed to the region it belongs to: in the forward, by the module
whose forward is running (hooks around every mixer, FFN, norm, the embedding and the head,
wrapping the region hooks); in the backward, by the autograd node running it, whose sequence
number falls in the range of nodes its module created in the forward.

The theory (:func:`theory`) is derived from the plans alone (Megatron, Shoeybi et al. 2019;
Korthikanti et al. 2022), ``X = [B, T, d_model]`` fp32:

- a region (mixer, FFN): forward all-reduce X, backward all-reduce X; with sequence
  parallelism all-gather X + reduce-scatter X each way;
- every replicated (or GroupSlice) parameter of a region: backward all-reduce of its size;
  under sequence parallelism each norm's weight too (it sees only the rank's tokens);
- replicated carry entries a region reads with a gradient (MoE's running aux loss, unless
  only the last MoE layer writes it (a 'global' balance loss and no z-loss), and balance sum
  of probabilities; RMoE's GRU weights and state): backward all-reduce of their size;
- partial sums, all-reduced forward and backward: Mamba-1 ``[B, T, dt_rank + 2 d_state]``,
  Mamba-2 / GMU gated norm over a group spanning ranks ``[B, T, 1]``, Titans 'mal'
  ``[B, T, d]``, 'mac' 2 (3 with per_token reads) x ``[B, L, d]`` per segment of L tokens
  (packed documents cut more pieces: more, smaller all-reduces, the same bytes), 'mag'
  2 x ``[B, T, 1]``;
- 'mag''s memory output, a sum over memory heads of which each rank needs its own columns:
  forward reduce-scatter, backward all-gather of ``[B, T, W]``;
- embedding: the exit of its partial sums (forward all-reduce X, or reduce-scatter X and a
  backward all-gather X); final norm -> head: an entry (backward all-reduce X, or forward
  all-gather X and backward reduce-scatter X); the head fused with the cross-entropy: per
  block of c tokens, 2 forward all-reduces, ``[c]`` fp32 (row max) and ``[2, c]`` (sum of
  exponentials, target logit): 3 x ``[B * T]`` fp32 in all.

Bytes are those of the whole (unsharded) tensor a collective reduces or gathers: an
all-reduce's tensor, an all-gather's output, a reduce-scatter's input.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from collections import defaultdict
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch.distributed.tensor import DTensor
from torch.distributed.tensor.debug import CommDebugMode
from torch.distributed.tensor.debug._comm_mode import c10d_collective_ops
from torch.utils._python_dispatch import TorchDispatchMode

ROOT = Path(__file__).resolve().parents[1]
VOCAB = 64
SMALL = ["model.d_model=32", f"model.vocab_size={VOCAB}"]
CASES: dict[str, tuple[str, list[str]]] = {
    "tiny": ("configs/tiny.toml", ["model.n_layers=2", "model.attention.window=5", "model.mamba.d_state=4"]),
    "llama_tiny": ("configs/llama_tiny.toml", ["model.n_layers=2", "model.attention.n_heads=4"]),
    "diff": ("configs/llama_tiny.toml", [
        'model.layer_pattern="diff_swa diff_attn"', "model.n_layers=2", "model.attention.n_heads=4",
        "model.attention.n_kv_heads=2", "model.attention.window=5",
    ]),
    "gla_tiny": ("configs/gla_tiny.toml", ["model.n_layers=2", "model.gla.chunk_size=4"]),
    "mamba2_tiny": ("configs/mamba2_tiny.toml", [
        "model.n_layers=2", "model.mamba2.d_state=4", "model.mamba2.chunk_size=4",
    ]),
    "mamba2_g2": ("configs/mamba2_tiny.toml", [
        "model.n_layers=2", "model.mamba2.d_state=4", "model.mamba2.chunk_size=4", "model.mamba2.n_groups=2",
    ]),
    "sambay_tiny": ("configs/sambay_tiny.toml", ["model.attention.window=5", "model.mamba.d_state=4"]),
    "sambay_m2": ("configs/sambay_tiny.toml", [  # a Mamba-2 memory: the GMU's gated norm spans ranks
        'model.layer_pattern=["mamba2_mem", "attn_kv", "gmu", "xattn"]', "model.n_layers=4",
        "model.mamba2.d_state=4", "model.mamba2.chunk_size=4", "model.mamba2.head_dim=16",
    ]),
    "titans": ("configs/titans_mac_tiny.toml", [
        'model.layer_pattern=["mac","mag","mal"]', "model.n_layers=3", "model.titans.segment_size=4",
        "model.titans.chunk_size=2", "model.titans.n_persistent=2", "model.attention.window=6",
    ]),
    # one model of several plans, for tests/distributed/test_tensor_parallel_comm.py
    "mix": ("configs/titans_mac_tiny.toml", [
        'model.layer_pattern=["mamba:moe", "mamba2:moe", "mal", "swa:none"]', "model.n_layers=4",
        "model.titans.segment_size=4", "model.titans.chunk_size=2", "model.titans.n_persistent=2",
        "model.attention.window=6", "model.mamba.d_state=4", "model.mamba2.d_state=4", "model.mamba2.chunk_size=4",
        "model.mamba2.head_dim=16", "model.moe.n_experts=4", "model.moe.balance='global'",
    ]),
    "moe": ("configs/rmoe_tiny.toml", ['model.layer_pattern="attn:moe"', "model.n_layers=2", "model.moe.n_experts=4"]),
    "rmoe_tiny": ("configs/rmoe_tiny.toml", ["model.n_layers=2", "model.moe.n_experts=4"]),
}
KINDS = ("all_reduce", "all_gather", "reduce_scatter")


def _kind(name: str) -> str:
    for kind, keys in (("all_gather", ("allgather", "all_gather")), ("reduce_scatter", ("reduce_scatter",)),
                       ("all_reduce", ("allreduce", "all_reduce"))):
        if any(k in name for k in keys):
            return kind
    return name


def _nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


class CommBytesMode(CommDebugMode):
    """CommDebugMode that also logs ``(phase, label, kind, bytes)`` of every collective.

    ``label``: the innermost labelled module running (forward) or whose forward created the
    running autograd node (backward); ``"other"`` when none."""

    def __init__(self, world: int) -> None:
        super().__init__()
        self.world = world
        self.log: list[tuple[str, str, str, int]] = []
        self.phase = "fwd"
        self.stack: list[str] = []
        self.ranges: list[tuple[int, int, str]] = []  # [start, end) autograd sequence numbers

    def __enter__(self):
        # CommDebugMode's module tracker pops its parent list once per forward hook it has
        # added, one per call of a module, so a module called twice in a forward (Titans'
        # attention projections) underflows it: our own labels replace it.
        super().__enter__()
        self.advanced_module_tracker.__exit__()
        return self

    def __exit__(self, *args):
        return TorchDispatchMode.__exit__(self, *args)

    def _label(self) -> str:
        if self.phase == "fwd":
            return self.stack[-1] if self.stack else "other"
        node = torch._C._current_autograd_node()
        if node is None:
            return "other"
        seq = node._sequence_nr()
        inside = [r for r in self.ranges if r[0] <= seq < r[1]]
        return min(inside, key=lambda r: r[1] - r[0])[2] if inside else "other"

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        packet = getattr(func, "_overloadpacket", None)
        plain = not any(t == DTensor for t in types)
        if plain and (packet in self.comm_registry or packet in c10d_collective_ops):
            name = str(packet)
            self.log.append((self.phase, self._label(), _kind(name), _payload(name, args, self.world)))
        return super().__torch_dispatch__(func, types, args, kwargs)


def _payload(name: str, args: tuple, world: int) -> int:
    """Bytes of the whole tensor a collective reduces or gathers (see the module docstring)."""
    kind = _kind(name)
    if "functional" in name:  # functional collectives: (input, ...)
        return _nbytes(args[0]) * (world if kind == "all_gather" else 1)
    if name == "c10d.allreduce_":  # ([tensors], ...): what torch.distributed.all_reduce issues
        return sum(_nbytes(t) for t in args[0])
    if name in ("c10d._allgather_base_", "c10d._reduce_scatter_base_"):  # (output, input, ...)
        return _nbytes(args[0] if kind == "all_gather" else args[1])
    raise NotImplementedError(f"the payload of {name} (add it here)")


def _seq() -> int:
    """The next autograd sequence number (a throwaway node takes the current one)."""
    with torch.enable_grad():
        return torch.zeros((), requires_grad=True).clone().grad_fn._sequence_nr()


def label_modules(model: torch.nn.Module, mode: CommBytesMode) -> None:
    """Hooks around the regions' (and the outside modules') own hooks, for the attribution."""
    labels = {"embed": "embed", "norm": "norm", "head": "head", "tied_head": "head"}
    for name, block in model.blocks.items():
        labels.update({f"blocks.{name}.mixer": f"{name}.mixer", f"blocks.{name}.ffn": f"{name}.ffn",
                       f"blocks.{name}.norm1": f"{name}.norms", f"blocks.{name}.norm2": f"{name}.norms"})
    for fqn, label in labels.items():
        try:
            module = model.get_submodule(fqn)
        except AttributeError:
            continue
        if module is None:
            continue

        def pre(m, args, label=label):
            mode.stack.append(label)
            m._comm_start = _seq()

        def post(m, args, out, label=label):
            mode.ranges.append((m._comm_start, _seq(), label))
            mode.stack.pop()

        module.register_forward_pre_hook(pre, prepend=True)
        module.register_forward_hook(post)


def measure(name: str, mesh, sp: bool, batch: int, seq: int) -> list[tuple[str, str, str, int]]:
    """The collectives of one forward + backward of case ``name`` at the mesh's tp."""
    from parallel.tensor.region import apply_tp
    from pretrain.config import load_config
    from pretrain.models import build_model

    path, overrides = CASES[name]
    torch.manual_seed(0)
    model = build_model(load_config(str(ROOT / path), [*SMALL, *overrides]).model)
    apply_tp(model, mesh, sp)
    g = torch.Generator().manual_seed(1)
    tokens = torch.randint(0, VOCAB, (batch, seq + 1), generator=g)
    pos = torch.arange(seq).repeat(batch, 1)
    mode = CommBytesMode(mesh.size())
    label_modules(model, mode)
    group = mesh.get_group()
    issued = group._get_sequence_number_for_group()
    with mode:
        loss, aux = model(tokens[:, :-1], position_ids=pos, labels=tokens[:, 1:], return_aux=True)
        loss = loss + aux.get("aux_loss", 0.0)
        mode.phase = "bwd"
        loss.backward()
    # two independent counts: CommDebugMode's own, and the process group's sequence number,
    # which every collective issued on it advances whichever way it was called (tp=2: the
    # partial sums' span groups are the tp group itself)
    issued = group._get_sequence_number_for_group() - issued
    if not mode.get_total_counts() == issued == len(mode.log):
        raise RuntimeError(f"{len(mode.log)} collectives logged, {mode.get_total_counts()} counted by "
                           f"CommDebugMode, {issued} issued on the tp group")
    return mode.log


# ----------------------------------------------------------------- theory


def _region_theory(model, cfg, i: int, mixer: str, ffn: str, tp: int, sp: bool, B: int, T: int):
    """{(phase, label): [(kind, bytes), ...]} of block ``i`` from its plans."""
    from parallel.tensor.region import tp_plans
    from pretrain.models.layers.moe import GRU_KEYS

    f4 = 4
    X = B * T * cfg.d_model * f4
    out: dict = defaultdict(list)
    border = {"fwd": [("all_gather", X), ("reduce_scatter", X)] if sp else [("all_reduce", X)],
              "bwd": [("all_gather", X), ("reduce_scatter", X)] if sp else [("all_reduce", X)]}
    mixer_plan, ffn_plan = tp_plans(cfg, tp)[i]
    block = model.blocks[str(i)]
    pattern = cfg.pattern()
    for part, plan, module in (("mixer", mixer_plan, block.mixer), ("ffn", ffn_plan, block.ffn)):
        if module is None:
            continue
        label = f"{i}.{part}"
        kind = mixer if part == "mixer" else ffn
        for phase in ("fwd", "bwd"):
            out[phase, label] += border[phase]
        for pname, p in module.named_parameters():  # replicated: the ranks' gradient parts summed
            if p.requires_grad and not isinstance(plan.layout(pname), torch.distributed.tensor.Shard):
                out["bwd", label].append(("all_reduce", p.numel() * f4))
        partial = []
        if kind in ("mamba", "mamba_mem"):
            partial = [B * T * (module.dt_rank + 2 * module.d_state) * f4]
        elif plan.partial_sums and kind in ("mamba2", "mamba2_mem", "gmu"):
            partial = [B * T * f4]
        elif kind == "mal":
            partial = [X]
        elif kind == "mac":  # per segment (positions 0..T-1: T / segment_size of them)
            reads = 3 if cfg.titans.mac_output == "per_token" else 2
            length = cfg.titans.segment_size
            pieces = [min(length, T - a) for a in range(0, T, length)]
            partial = [B * n * cfg.d_model * f4 for n in pieces for _ in range(reads)]
        elif kind == "mag":
            partial = [B * T * f4] * 2
        for phase in ("fwd", "bwd"):
            out[phase, label] += [("all_reduce", n) for n in partial]
        for _, span in plan.scatter_partials.items():  # MAG's memory output [B, T, W]: each rank its columns
            width = module.memory.out.weight.shape[0] if kind == "mag" else cfg.d_model
            out["fwd", label].append(("reduce_scatter", B * T * width * f4))
            out["bwd", label].append(("all_gather", B * T * width * f4))
        if part == "ffn" and kind in ("moe", "moe_gru"):  # replicated carry entries read with a gradient
            earlier = [f for _, f in pattern[:i] if f in ("moe", "moe_gru")]
            carry = []
            if earlier:
                # the running aux loss: written by every MoE layer, except that a 'global'
                # balance loss is added only by the last one (then only a z-loss is earlier)
                if cfg.moe.balance == "per_layer" or cfg.moe.z_loss_coef > 0:
                    carry.append(f4)
                if cfg.moe.balance == "global":
                    carry.append(cfg.moe.n_experts * f4)  # the running mean router probability
            if kind == "moe_gru":
                carry += [getattr(model.router_gru, k.split(".")[1]).numel() * f4 for k in GRU_KEYS]
                if any(f == "moe_gru" for f in earlier):
                    carry.append(B * T * cfg.moe.router_hidden * f4)  # router_h
            out["bwd", label] += [("all_reduce", n) for n in carry]
    if sp:  # the norms' weights see only the rank's tokens
        norms = [block.norm1] + ([block.norm2] if block.ffn is not None else [])
        out["bwd", f"{i}.norms"] += [("all_reduce", n.weight.numel() * f4) for n in norms]
    return out


def theory(model, tp: int, sp: bool, B: int, T: int) -> dict:
    """{(phase, label): [(kind, bytes), ...]} of one forward + backward, from the plans."""
    cfg = model.cfg
    X = B * T * cfg.d_model * 4
    out: dict = defaultdict(list)
    for i, (mixer, ffn) in enumerate(cfg.pattern()):
        for k, v in _region_theory(model, cfg, i, mixer, ffn, tp, sp, B, T).items():
            out[k] += v
    out["fwd", "embed"] = [("reduce_scatter", X)] if sp else [("all_reduce", X)]
    if sp:
        out["bwd", "embed"] = [("all_gather", X)]
        out["fwd", "norm"] = [("all_gather", X)]
        out["bwd", "norm"] = [("reduce_scatter", X), ("all_reduce", cfg.d_model * 4)]
    else:
        out["bwd", "norm"] = [("all_reduce", X)]
    # the head fused with the loss: per block of tokens, the max, then the sum of exponentials
    # and the target logit together (kernels/linear_cross_entropy)
    from kernels.linear_cross_entropy.chunk_torch import auto_chunk_size

    chunk = auto_chunk_size(B * T, cfg.d_model, -(-cfg.vocab_size // tp))
    for start in range(0, B * T, chunk):
        n = min(chunk, B * T - start)
        out["fwd", "head"] += [("all_reduce", n * 4), ("all_reduce", 2 * n * 4)]
    return out


def _theory_for(name: str, tp: int, sp: bool, B: int, T: int) -> dict:
    from pretrain.config import load_config
    from pretrain.models import build_model

    path, overrides = CASES[name]
    torch.manual_seed(0)
    return theory(build_model(load_config(str(ROOT / path), [*SMALL, *overrides]).model), tp, sp, B, T)


def _group(log) -> dict:
    out: dict = defaultdict(list)
    for phase, label, kind, size in log:
        out[phase, label].append((kind, size))
    return out


def compare(name: str, log, tp: int, sp: bool, B: int, T: int) -> list[dict]:
    """One row per label: measured and theoretical (kind, bytes) lists, forward and backward."""
    meas, theo = _group(log), _theory_for(name, tp, sp, B, T)
    labels = sorted({lab for _, lab in (*meas, *theo)}, key=_order)
    rows = []
    for lab in labels:
        row = {"case": name, "sp": sp, "label": lab}
        for phase in ("fwd", "bwd"):
            row[f"m_{phase}"] = sorted(meas.get((phase, lab), []))
            row[f"t_{phase}"] = sorted(theo.get((phase, lab), []))
        rows.append(row)
    return rows


def _order(label: str):
    head = {"embed": (-1, ""), "norm": (1e9, "a"), "head": (1e9, "b"), "other": (1e9, "d")}
    if label in head:
        return head[label]
    i, part = label.split(".")
    return (int(i), {"norms": "0", "mixer": "1", "ffn": "2"}[part])


# ----------------------------------------------------------------- processes


def _rank_main(rank: int, world: int, store: str, out: str, batch: int, seq: int, names: list[str]) -> None:
    from torch.distributed.device_mesh import init_device_mesh

    torch.set_num_threads(1)
    dist.init_process_group("gloo", store=dist.FileStore(store, world), rank=rank, world_size=world)
    mesh = init_device_mesh("cpu", (world,), mesh_dim_names=("tp",))
    logs = measure_all(names, mesh, batch, seq)
    if rank == 0:
        torch.save(logs, out)
    dist.barrier()
    dist.destroy_process_group()
    sys.stdout.flush()
    os._exit(0)  # gloo may abort in C++ destructors at interpreter exit (see tests/conftest.py)


def measure_all(names: list[str], mesh, batch: int, seq: int) -> dict:
    """{(case, sequence_parallel): collective log} for every case of ``names``."""
    return {(n, sp): measure(n, mesh, sp, batch, seq) for n in names for sp in (False, True)}


def run_all(names: list[str], batch: int, seq: int, tp: int = 2) -> list[dict]:
    """Spawn ``tp`` gloo ranks, measure every case of ``names`` with and without SP, compare."""
    with tempfile.TemporaryDirectory() as tmp:
        out = f"{tmp}/logs.pt"
        mp.start_processes(_rank_main, args=(tp, f"{tmp}/store", out, batch, seq, names), nprocs=tp,
                           start_method="spawn")
        logs = torch.load(out)
    return compare_all(logs, tp, batch, seq)


def compare_all(logs: dict, tp: int, batch: int, seq: int) -> list[dict]:
    """The rows of :func:`compare` for every log of :func:`measure_all`."""
    rows = []
    for (name, sp), log in logs.items():
        rows += compare(name, log, tp, sp, batch, seq)
    return rows


def _kind_of(cfg_pattern, label: str) -> str:
    if "." not in label:
        return label
    i, part = label.split(".")
    mixer, ffn = cfg_pattern[int(i)]
    return {"mixer": mixer, "ffn": ffn, "norms": "norms"}[part]


def _variant(cfg, kind: str, label: str) -> str:
    """The layer type, with the variants whose communication differs (B/C groups, GMU norm)."""
    from pretrain.models.layers.gmu import memory_layout

    if kind.startswith("mamba2"):
        return f"{kind} g={cfg.mamba2.n_groups}"
    if kind == "gmu":
        return "gmu+norm" if memory_layout(cfg, int(label.split(".")[0]))[1] else "gmu"
    return kind


def _fmt(pairs) -> str:
    return f"{sum(b for _, b in pairs):>7}"


def _counts(pairs) -> str:
    c = defaultdict(int)
    for k, _ in pairs:
        c[k] += 1
    return " ".join(f"{k.split('_')[0][0].upper()}{k.split('_')[1][0].upper()}{c[k]}" for k in KINDS if c[k]) or "-"


def _line(name: str, sp: bool, layer: str, m_fwd, m_bwd, t_fwd, t_bwd) -> str:
    m = sum(b for _, b in m_fwd + m_bwd)
    t = sum(b for _, b in t_fwd + t_bwd)
    ok = m_fwd == t_fwd and m_bwd == t_bwd
    ratio = f"{m / t:.2f}" if t else ("-" if not m else "inf")
    return (f"{name:<12}{'y' if sp else 'n':<4}{layer:<18}{_fmt(m_fwd)}  {_fmt(m_bwd)}  {_fmt(t_fwd)}  {_fmt(t_bwd)}"
            f"{ratio:>7}  {_counts(m_fwd)}/{_counts(m_bwd)} | {_counts(t_fwd)}/{_counts(t_bwd)}"
            f"{'' if ok else '   <-- MISMATCH'}")


HEADER = (f"{'case':<12}{'sp':<4}{'layer':<18}{'meas fwd':>9}{'meas bwd':>9}{'theo fwd':>9}{'theo bwd':>9}"
          f"{'ratio':>7}  collectives fwd/bwd: measured | theory")


def print_tables(rows: list[dict], tp: int, full: bool) -> int:
    """Prints one row per layer type (its first block, or every block with ``full``) and one
    per whole model; returns the number of mismatching rows (all of them are printed)."""
    from pretrain.config import load_config

    print(f"tp={tp}, bytes of one forward / backward; AR all-reduce, AG all-gather, RS reduce-scatter")
    print(f"\nper layer ({'every block' if full else 'first block of each type'}); "
          "'norms': a block's norm weights, 'norm': final norm -> head entry")
    print(HEADER)
    bad, seen = 0, set()
    totals: dict = {}
    for r in rows:
        path, overrides = CASES[r["case"]]
        cfg = load_config(str(ROOT / path), [*SMALL, *overrides]).model
        kind = _variant(cfg, _kind_of(cfg.pattern(), r["label"]), r["label"])
        ok = r["m_fwd"] == r["t_fwd"] and r["m_bwd"] == r["t_bwd"]
        bad += not ok
        if full or not ok or (kind, r["sp"]) not in seen:
            seen.add((kind, r["sp"]))
            layer = f"{r['label']} {kind}" if full else kind
            print(_line(r["case"], r["sp"], layer, r["m_fwd"], r["m_bwd"], r["t_fwd"], r["t_bwd"]))
        total = totals.setdefault((r["case"], r["sp"]), {k: [] for k in ("m_fwd", "m_bwd", "t_fwd", "t_bwd")})
        for k in total:
            total[k] += r[k]
    print("\nwhole models")
    print(HEADER)
    for (name, sp), t in totals.items():
        print(_line(name, sp, "model", *(sorted(t[k]) for k in ("m_fwd", "m_bwd", "t_fwd", "t_bwd"))))
    return bad


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--seq", type=int, default=16)
    p.add_argument("--full", action="store_true", help="a row per block, not per layer type")
    p.add_argument("cases", nargs="*", default=list(CASES))
    args = p.parse_args(argv)
    rows = run_all(args.cases, args.batch, args.seq)
    bad = print_tables(rows, 2, args.full)
    print(f"\n{bad} mismatching rows")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT))
    sys.exit(main())
