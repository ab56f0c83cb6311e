"""Context parallelism on the CPU: activation memory per rank, bytes exchanged per layer type and
tokens/s at cp 2 against one process, for a SambaY- and a GLA-shaped model.

    python bench/context_parallel.py [--lengths 8192 16384 32768] [--models sambay gla]
                                     [--cp-attention allgather ring] [--repeats 2] [--quick] [--out DIR]

Models (fp32, the PyTorch paths, d_model 128, 4 query heads / 1 KV head of 32, window 128):
SambaY is ``sambay_pattern(8)`` (Mamba + SWA self-decoder, one full-attention layer whose K/V
the GMU / cross-attention decoder shares); GLA is four 'gla:mlp' blocks. One sequence per step.
``--cp-attention`` runs the cp 2 side with each parallel.cp_attention mode (rows 'sambay/ring'):
ring attention keeps no gathered keys/values, and its cross-attention layers ring themselves.

- Activation memory: the bytes of the distinct storages the forward saves for the backward
  (``saved_tensors_hooks``), per rank. Goal at cp 2: <= 0.6x one process (the bound is 0.5x plus
  what a rank holds whole: gathered keys/values, halos).
- Exchanged bytes: what one rank receives per layer in the forward, counted at the split's
  exchanges and labelled by the block that made them, beside `pretrain plan`'s formula
  (:func:`parallel.context.cp_traffic`) and the all-gather of one layer's hidden states (the
  baseline of schemes that gather the sequence). The backward moves as much again.
- Tokens/s of forward + backward: one process with one thread against two processes with one
  thread each (the same thread count per process: this measures the split, not the thread pool);
  the bound is 2x (two cores), less the exchanges and the work a rank repeats.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repository, before bench/ (bench/kernels.py)

from pretrain.config import load_config  # noqa: E402
from pretrain.config.parallel import FULL_ATTENTION  # noqa: E402
from pretrain.models import build_model  # noqa: E402
from pretrain.models.sambay import sambay_pattern  # noqa: E402

SHAPES = ["model.d_model=128", "model.attention.n_heads=4", "model.attention.n_kv_heads=1",
          "model.attention.head_dim=32", "model.attention.window=128", "model.mamba.d_state=16",
          "model.vocab_size=4096", "data.vocab_size=4096", "model.gla.n_heads=4", "model.ffn_hidden=256",
          "model.doc_masking=false"]
PATTERNS = {"sambay": " ".join(sambay_pattern(8)), "gla": "gla:mlp gla:mlp gla:mlp gla:mlp"}


def config(name: str, seq: int, cp: int = 1, cp_attention: str = "allgather"):
    pattern = PATTERNS[name]
    return load_config("configs/tiny.toml", [*SHAPES, f"model.layer_pattern='{pattern}'",
                                             f"model.n_layers={len(pattern.split())}", f"data.seq_len={seq}",
                                             f"parallel.cp={cp}", f"parallel.cp_attention='{cp_attention}'",
                                             "train.micro_batch_size=1", "train.global_batch_size=1"])


def saved_bytes(fn, params: set[int]) -> tuple[int, object]:
    """Bytes of the distinct storages saved for backward while ``fn()`` runs, but for those in
    ``params`` (the parameters' data pointers)."""
    seen: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        s = t.untyped_storage()
        seen[s.data_ptr()] = s.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn()
    return sum(n for ptr, n in seen.items() if ptr not in params), out


def measure(model, ids: torch.Tensor, repeats: int, split=None) -> dict:
    """Saved bytes and the median seconds of forward + backward of one sequence ``ids [1, T + 1]``."""
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    model.sequence_split = split
    x, y = ids[:, :-1], ids[:, 1:]
    if split is not None:
        x, y = split.shard(x), split.shard(y)
    nbytes, loss = saved_bytes(lambda: model(x, labels=y), params)
    loss.backward()
    times = []
    for _ in range(repeats):
        if split is not None:
            dist.barrier()
        start = time.perf_counter()
        model(x, labels=y).backward()
        times.append(time.perf_counter() - start)
    model.zero_grad(set_to_none=True)
    return {"saved": nbytes, "seconds": statistics.median(times)}


def _rank(rank: int, name: str, seq: int, repeats: int, mode: str, store: str, out: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", store=dist.FileStore(store, 2), rank=rank, world_size=2)
    cfg = config(name, seq, cp=2, cp_attention=mode)
    torch.manual_seed(0)
    model = build_model(cfg.model)
    split = _counting_split()(dist.group.WORLD, cfg.parallel.load_balanced(cfg.model.pattern()))
    split.ring = mode == "ring"
    for block in model.blocks.values():
        block.register_forward_pre_hook(lambda m, args: setattr(split, "label", m.mixer_name))
    ids = torch.randint(0, 4096, (1, seq + 1), generator=torch.Generator().manual_seed(1))
    split.counting = True
    result = measure(model, ids, repeats, split)
    result["received"] = split.received
    Path(out, f"rank{rank}.json").write_text(json.dumps(result))
    dist.barrier()
    dist.destroy_process_group()


def _counting_split():
    from parallel.context import DistributedSplit

    class Counting(DistributedSplit):
        """Counts the bytes this rank receives at each exchange of the first forward, by layer."""

        label = "?"
        counting = False

        def __init__(self, *args) -> None:
            super().__init__(*args)
            self.received: dict[str, float] = {}

        def _count(self, nbytes: float) -> None:
            if self.counting:
                self.received[self.label] = self.received.get(self.label, 0.0) + nbytes

        def start_forward(self) -> None:
            super().start_forward()
            if self.received:
                self.counting = False  # only the first forward's exchanges

        def gather_segments(self, x):
            self._count((self.cp - 1) * x.numel() * x.element_size())
            return super().gather_segments(x)

        def all_sum(self, x):
            self._count((self.cp - 1) * x.numel() * x.element_size())
            return super().all_sum(x)

        def ring_attention(self, q, k, v, doc_start):
            # the forward's cp - 1 hops of this rank's keys/values (its ring_exchange runs in the
            # backward too, which this bench does not count)
            self._count((self.cp - 1) * (k.numel() * k.element_size() + v.numel() * v.element_size()))
            return super().ring_attention(q, k, v, doc_start)

        def relay(self, step, like):
            received = sum(1 for g in self.local if g > 0 and self.owner[g - 1] != self.rank)
            self._count(received * sum(t.numel() * t.element_size() for t in like))
            return super().relay(step, like)

    return Counting


def run(name: str, seq: int, repeats: int, modes: list[str]) -> dict:
    """One process, then cp 2 with each full-attention mode of ``modes``: ``{"one": ...,
    mode: {"ranks": ..., "plan": ...}}``."""
    torch.set_num_threads(1)
    cfg = config(name, seq)
    torch.manual_seed(0)
    model = build_model(cfg.model)
    ids = torch.randint(0, 4096, (1, seq + 1), generator=torch.Generator().manual_seed(1))
    result = {"one": measure(model, ids, repeats)}
    del model
    from parallel.context import cp_traffic

    for mode in modes:
        with tempfile.TemporaryDirectory() as tmp:
            mp.start_processes(_rank, args=(name, seq, repeats, mode, str(Path(tmp, "store")), tmp), nprocs=2,
                               start_method="spawn")
            ranks = [json.loads(Path(tmp, f"rank{r}.json").read_text()) for r in range(2)]
        cp_cfg = config(name, seq, cp=2, cp_attention=mode)
        lb = cp_cfg.parallel.load_balanced(cp_cfg.model.pattern())
        plan = {m: b for m, _, b in cp_traffic(cp_cfg.model, 1, seq, 2, lb, attention=mode)}
        result[mode] = {"ranks": ranks, "plan": plan}
    return result


def _rows(label: str, pattern: str, seq: int, one: dict, ranks: list[dict], plan: dict) -> tuple[str, list[str]]:
    """The memory/speed row of one cp 2 run and its rows of bytes received per layer type."""
    saved = max(k["saved"] for k in ranks)
    seconds = max(k["seconds"] for k in ranks)
    row = (f"| {label} | {seq} | {one['saved'] / 2**20:.1f} | {saved / 2**20:.1f} | {saved / one['saved']:.2f}x "
           f"(goal <= 0.6) | {seq / one['seconds']:.0f} | {seq / seconds:.0f} | {one['seconds'] / seconds:.2f}x (bound 2.0) |")
    n_layers: dict[str, int] = {}
    for mixer in pattern.split():
        mixer = mixer.split(":")[0]
        n_layers[mixer] = n_layers.get(mixer, 0) + 1
    comm = []
    for mixer, nbytes in ranks[0]["received"].items():
        per_layer = nbytes / n_layers.get(mixer, 1)
        comm.append(f"| {label} | {seq} | {mixer} | {per_layer / 2**20:.3f} | {plan.get(mixer, 0) / 2**20:.3f} "
                    f"| {plan['(baseline)'] / 2**20:.3f} |")
    return row, comm


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--lengths", type=int, nargs="+", default=[8192, 16384, 32768])
    ap.add_argument("--models", nargs="+", default=["sambay", "gla"], choices=sorted(PATTERNS))
    ap.add_argument("--cp-attention", nargs="+", default=["allgather"], choices=["allgather", "ring"],
                    help="parallel.cp_attention modes of the cp 2 runs")
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--quick", action="store_true", help="T = 8192 only, one repeat")
    ap.add_argument("--out", default=None, help="a directory for context_parallel.md")
    args = ap.parse_args()
    if args.quick:
        args.lengths, args.repeats = [8192], 1
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    rows, comm = [], []
    for name in args.models:
        for seq in args.lengths:
            if name == "sambay" and seq > 16384:
                continue  # two full-attention layers at 32K: minutes per step on one core
            # the mode changes only full attention: a model without it runs once
            modes = args.cp_attention if any(m.split(":")[0] in FULL_ATTENTION for m in PATTERNS[name].split()) else [
                "allgather"]
            r = run(name, seq, args.repeats, modes)
            for mode in modes:
                label = name if mode == "allgather" else f"{name}/{mode}"
                row, layers = _rows(label, PATTERNS[name], seq, r["one"], r[mode]["ranks"], r[mode]["plan"])
                rows.append(row)
                comm += layers
                print(row, file=sys.stderr, flush=True)  # progress; the table follows on stdout
    table = ["| model | T | one process act MiB | cp2 act MiB/rank | ratio | one tok/s | cp2 tok/s | speed-up |",
             "|---|---|---|---|---|---|---|---|", *rows, "",
             "| model | T | layer | received MiB/layer (fwd, measured) | plan | all-gather of hidden states |",
             "|---|---|---|---|---|---|", *comm]
    text = "\n".join(table)
    print(text)
    if args.out:
        Path(args.out).mkdir(parents=True, exist_ok=True)
        Path(args.out, "context_parallel.md").write_text(text + "\n")


if __name__ == "__main__":
    main()
