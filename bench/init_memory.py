"""Peak host memory (RSS) per rank of building a model and training one step, per layout.

    python bench/init_memory.py configs/sambay_d16.toml --layouts 1 tp2 dp_shard4 \\
        [--set train.micro_batch_size=1 data.seq_len=64 ...]

Each layout ('1': one process; 'tpN', 'dp_shardN', 'dp_shardNxtpM') runs as fresh gloo ranks on
the CPU, each constructing the :class:`~pretrain.train.trainer.Trainer` (model, TP/FSDP plans,
optimizer, data loader) and running one ``train_step`` in fp32. Columns, the maximum over ranks
of ``getrusage`` ``ru_maxrss`` (GiB): ``start`` (after the imports), ``built`` (after the
Trainer's construction), ``step`` (after one step); ``bound``: ``start`` plus the weights a rank
must hold while building, its shards (parameter bytes / (tp x dp_shard)) plus the largest
init unit whole (:meth:`~pretrain.models.HybridLM.init_units`); ``x one`` is ``built`` as a
ratio of the one-process run's. The data is a small slice of the built-in corpus prepared once
(with a 256-token tokenizer; the model keeps the config's vocabulary).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import resource
import socket
import sys
import tempfile
from pathlib import Path

import torch
import torch.multiprocessing as mp


def _rss_gib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB -> GiB


def parse_layout(layout: str) -> dict[str, int]:
    """'1' -> {}; 'tp2' -> {'tp': 2}; 'dp_shard2xtp2' -> {'dp_shard': 2, 'tp': 2}. Raises
    ValueError on another form."""
    if layout == "1":
        return {}
    out = {}
    for part in layout.split("x"):
        m = re.fullmatch(r"(tp|dp_shard|dp_replicate)(\d+)", part)
        if m is None:
            raise ValueError(f"layout {layout!r}: expected '1' or parts like tp2, dp_shard4 joined by 'x'")
        out[m.group(1)] = int(m.group(2))
    return out


def _rank(rank: int, world: int, port: int, path: str, overrides: list[str], out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                      WORLD_SIZE=str(world), LOCAL_RANK=str(rank))
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // world))
    from parallel.dims import destroy_distributed
    from pretrain.config import load_config
    from pretrain.train.trainer import Trainer

    start = _rss_gib()
    trainer = Trainer(load_config(path, overrides), resume="none", log=lambda *_: None)
    built = _rss_gib()
    loss = trainer.train_step()["loss"].item()
    record = {"rank": rank, "start": start, "built": built, "step": _rss_gib(), "loss": loss}
    Path(out, f"rank{rank}.json").write_text(json.dumps(record))
    destroy_distributed()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _corpus(work: Path) -> Path:
    from pretrain.data.sources import builtin_files

    out = work / "corpus.jsonl"
    with open(builtin_files("kjv")[0]) as f, open(out, "w") as g:
        for _, line in zip(range(2000), f):
            g.write(json.dumps({"text": json.loads(line)["text"]}) + "\n")
    return out


def weight_bytes(path: str, overrides: list[str]) -> tuple[int, int]:
    """(all parameter bytes, the largest init unit's parameter bytes) of the config's model,
    from a meta-device build."""
    from pretrain.config import load_config
    from pretrain.models import build_model

    cfg = load_config(path, overrides)
    with torch.device("meta"):
        model = build_model(cfg.model)
    nbytes = lambda m: sum(p.numel() * p.element_size() for p in m.parameters())  # noqa: E731
    return nbytes(model), max(nbytes(model.get_submodule(n)) for n in model.init_units())


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("config")
    ap.add_argument("--layouts", nargs="+", default=["1", "tp2", "dp_shard4"])
    ap.add_argument("--set", nargs="*", default=[], dest="overrides")
    args = ap.parse_args(argv)
    work = Path(tempfile.mkdtemp(prefix="init_memory_"))
    vocab = next((o.split("=", 1)[1] for o in args.overrides if o.startswith("model.vocab_size=")), None)
    base = [
        f"data.sources=['{_corpus(work)}']", f"data.dir='{work / 'data'}'", "data.vocab_size=256",
        "data.num_workers=1", "train.device=cpu", "train.dtype=fp32", "train.compile=false",
        *args.overrides,
    ]
    from pretrain.config import load_config

    if vocab is None:  # keep the config's vocabulary on the model, whatever the tokenizer's
        base.append(f"model.vocab_size={load_config(args.config, []).model.vocab_size or 256}")
    total, unit = weight_bytes(args.config, base)
    print(f"{args.config}: {total / 2**30:.2f} GiB of fp32 weights, largest init unit {unit / 2**30:.3f} GiB")
    head = f"{'layout':<14}{'ranks':>6}{'start':>8}{'built':>8}{'bound':>8}{'step':>8}{'x one':>7}"
    print(f"{head}  (GiB, max over ranks)")
    one = None
    for layout in args.layouts:
        dims = parse_layout(layout)
        world = max(1, dims.get("tp", 1) * dims.get("dp_shard", 1) * dims.get("dp_replicate", 1))
        shards = dims.get("tp", 1) * dims.get("dp_shard", 1)
        micro = next((int(o.split("=")[1]) for o in args.overrides if o.startswith("train.micro_batch_size=")), 1)
        dp = world // dims.get("tp", 1)
        overrides = [
            *base, f"run.dir='{work / layout}'", f"train.global_batch_size={dp * micro}",
            f"parallel.tp={dims.get('tp', 1)}", f"parallel.dp_replicate={dims.get('dp_replicate', 1)}",
        ]
        out = work / f"out-{layout}"
        out.mkdir()
        mp.start_processes(_rank, args=(world, _free_port(), args.config, overrides, str(out)),
                           nprocs=world, start_method="spawn")
        ranks = [json.loads((out / f"rank{r}.json").read_text()) for r in range(world)]
        worst = {k: max(r[k] for r in ranks) for k in ("start", "built", "step")}
        bound = worst["start"] + (total / shards + unit) / 2**30
        one = worst["built"] if one is None and layout == "1" else one
        ratio = f"{worst['built'] / one:7.2f}" if one else f"{'-':>7}"
        print(f"{layout:<14}{world:>6}{worst['start']:8.2f}{worst['built']:8.2f}{bound:8.2f}{worst['step']:8.2f}{ratio}"
              f"  loss {ranks[0]['loss']:.4f}", flush=True)


if __name__ == "__main__":
    sys.exit(main())
