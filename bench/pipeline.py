"""Pipeline-parallel throughput, bubble and memory, side by side with one process.

    python bench/pipeline.py [--pp 2] [--microbatches 8] [--steps 3] [--out runs/bench-pipeline]
    python bench/pipeline.py --device cuda            # one GPU per rank, nccl; skips without them
    python bench/pipeline.py --memory [--memory-pp 2 4]  # peak RSS per rank, configs/sambay_d16.toml

Throughput: every schedule of parallel.pipeline (gpipe, 1f1b; interleaved_1f1b, zero_bubble
with 2 virtual stages; zbv) runs ``pp`` ranks (gloo on CPU) over ``m`` micro-batches, against
one process that runs the same model on the same global batch as ``m`` accumulated
micro-batches; both time forward + backward only (no optimizer step). The speed-up is
t(one process) / t(pipeline) and is printed as a fraction of the GPipe bound
``p m / (m + p - 1)`` (Huang et al. 2019). The bubble of a rank is 1 - (time inside its stage
actions: forward, backward, input- and weight-gradient, loss) / step time, measured by
wrapping the PipelineStage actions; the table prints beside it the bubble each schedule would
have with equal stages and free communication. On CPU every process, the single-process
baseline included, runs one intra-op thread, so the ratio measures the schedule and not the
thread pool; it needs ``pp`` free cores. On CUDA each action is synchronised to be timed,
which removes compute/communication overlap: read the per-stage times, not the speed-up.

A PNG timeline of the last timed step of every schedule (per rank: F forward, B full
backward, I input-gradient, W weight-gradient, L loss; the number is the micro-batch, the
hatch marks the rank's second virtual stage) goes to ``--out``.

Memory: one training step of configs/sambay_d16.toml at micro-batch 1, seq_len 32 under GPipe
(``--memory-pp 1`` is one process running the whole model as one stage), each rank reporting its
peak RSS (getrusage ru_maxrss). A layout whose estimated total (weights + gradients + optimizer
state + ~1 GiB per process) does not fit in the available memory is skipped: run it with
``--optimizer sgd`` (no state), and each rank also prints its AdamW estimate, the SGD peak plus
the two fp32 moments (8 B per parameter).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

SCHEDULES = [("gpipe", 1), ("1f1b", 1), ("interleaved_1f1b", 2), ("zero_bubble", 2), ("zbv", 2)]
COLOURS = {"F": "#4c72b0", "B": "#dd8452", "I": "#c44e52", "W": "#55a868", "L": "#8172b3"}


def ideal_bubble(schedule: str, p: int, m: int, v: int) -> float:
    """Bubble fraction of a schedule with equal stages and free communication: (p - 1) / (v m +
    p - 1) for GPipe/1F1B (v = 1) and interleaved 1F1B (Narayanan et al. 2021); the zero-bubble
    schedules fill it with weight-gradient work (Qi et al. 2024), 0 in that model."""
    return 0.0 if schedule in ("zero_bubble", "zbv") else (p - 1) / (v * m + p - 1)


def _config(args: argparse.Namespace, schedule: str = "gpipe", virtual: int = 1, pp: int = 1):
    from pretrain.config import load_config

    sets = [*args.overrides, f"parallel.pp={pp}", f"parallel.pp_schedule={schedule}",
            f"parallel.pp_virtual_stages={virtual}"]
    return load_config(args.config, sets)


def _batch(vocab: int, rows: int, seq: int, device: torch.device):
    g = torch.Generator().manual_seed(1)
    tokens = torch.randint(0, vocab, (rows, seq + 1), generator=g).to(device)
    return tokens[:, :-1], tokens[:, 1:]


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _instrument(stage, spans: list, t0: list, device: torch.device, second: bool) -> None:
    """Wrap ``stage``'s actions so each appends (kind, micro-batch, start, end, second virtual
    stage) to ``spans``, times relative to ``t0[0]``."""

    def wrap(name: str, kind_of):
        inner = getattr(stage, name)

        def timed(chunk, *a, **kw):
            _sync(device)
            start = time.perf_counter()
            out = inner(chunk, *a, **kw)
            _sync(device)
            spans.append((kind_of(kw), chunk, start - t0[0], time.perf_counter() - t0[0], second))
            return out

        setattr(stage, name, timed)

    wrap("forward_one_chunk", lambda kw: "F")
    wrap("backward_one_chunk", lambda kw: "B" if kw.get("full_backward", True) else "I")
    wrap("backward_weight_one_chunk", lambda kw: "W")


def _timed_loss(loss_fn, spans: list, t0: list, device: torch.device):
    count = [0]

    def call(outputs, labels):
        _sync(device)
        start = time.perf_counter()
        out = loss_fn(outputs, labels)
        _sync(device)
        spans.append(("L", count[0] % loss_fn.n, start - t0[0], time.perf_counter() - t0[0], False))
        count[0] += 1
        return out

    call.n, call.records = loss_fn.n, loss_fn.records
    return call


def _pipeline_rank(rank: int, world: int, store: str, out_dir: str, args: argparse.Namespace) -> None:
    """One rank of the throughput run: every schedule, one warm-up step then ``args.steps``."""
    from torch.distributed.pipelining import PipelineStage

    from parallel.pipeline.schedule import PipelineLoss, build_schedule, stages_of_rank
    from parallel.pipeline.schedule import step as pipeline_step
    from parallel.pipeline.split import plan_split
    from parallel.pipeline.stage import build_stage

    torch.set_num_threads(1)
    cuda = args.device == "cuda"
    device = torch.device(f"cuda:{rank}") if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    dist.init_process_group("nccl" if cuda else "gloo", store=dist.FileStore(store, world), rank=rank,
                            world_size=world)
    m, mb = args.microbatches, args.micro_batch
    results = {}
    for schedule, virtual in SCHEDULES:
        cfg = _config(args, schedule, virtual, world)
        cuts = list(plan_split(cfg.model, cfg.parallel, args.seq, mb).cuts)
        cuts = cuts if cuts[:1] == [0] else [0, *cuts]  # plan_split omits the first stage's 0
        n_stages = world * virtual
        mine = stages_of_rank(schedule, rank, world, virtual)
        local = [build_stage(cfg.model, cuts, s, 0, device) for s in mine]
        stages = [PipelineStage(mod, mod.stage, n_stages, device) for mod in local]
        spans: list = []
        t0 = [0.0]
        for k, st in enumerate(stages):
            _instrument(st, spans, t0, device, k > 0)
        last = next((mod for mod in local if mod.is_last), None)
        loss_fn = _timed_loss(PipelineLoss(last.out_keys if last else [], m), spans, t0, device)
        sched = build_schedule(schedule, stages, m, loss_fn)
        inputs, labels = _batch(cfg.model.vocab_size, m * mb, args.seq, device)
        ids = inputs if any(mod.is_first for mod in local) else None
        targets = labels if last is not None else None
        times, busy = [], []
        for i in range(1 + args.steps):
            for mod in local:
                mod.zero_grad(set_to_none=True)
            _sync(device)
            dist.barrier()
            spans.clear()
            t0[0] = time.perf_counter()
            pipeline_step(sched, loss_fn, ids, targets)  # the last stage's head takes the labels
            _sync(device)
            times.append(time.perf_counter() - t0[0])
            busy.append(sum(end - start for _, _, start, end, _ in spans))
        results[schedule] = {"times": times[1:], "busy": busy[1:], "spans": spans, "last": times[-1],
                             "stages": mine, "cuts": cuts}
        del sched, stages, local
    with open(f"{out_dir}/rank{rank}.json", "w") as f:
        json.dump(results, f)
    dist.destroy_process_group()


def _single_process(args: argparse.Namespace) -> float:
    """Seconds per forward + backward of the global batch in one process, as ``m`` accumulated
    micro-batches (median of ``args.steps`` after a warm-up)."""
    from pretrain.models import build_model
    from pretrain.train.trainer import lm_loss

    torch.set_num_threads(1)
    device = torch.device("cuda:0" if args.device == "cuda" else "cpu")
    cfg = _config(args)
    torch.manual_seed(0)
    model = build_model(cfg.model).to(device)
    m, mb = args.microbatches, args.micro_batch
    inputs, labels = _batch(cfg.model.vocab_size, m * mb, args.seq, device)
    times = []
    for _ in range(1 + args.steps):
        model.zero_grad(set_to_none=True)
        _sync(device)
        start = time.perf_counter()
        for i in range(m):
            rows = slice(i * mb, (i + 1) * mb)
            (lm_loss(model(inputs[rows]), labels[rows]) / m).backward()
        _sync(device)
        times.append(time.perf_counter() - start)
    return _median(times[1:])


def _median(xs: list[float]) -> float:
    return sorted(xs)[len(xs) // 2]


def _timeline(ranks: list[dict], path: Path, p: int, m: int) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import Patch

    names = [s for s, _ in SCHEDULES]
    fig, axes = plt.subplots(len(names), 1, figsize=(14, 1.3 * p * len(names) + 1), squeeze=False)
    for ax, name in zip(axes[:, 0], names):
        end = max(r[name]["last"] for r in ranks)
        for rank, r in enumerate(ranks):
            for kind, mbi, start, stop, second in r[name]["spans"]:
                ax.barh(rank, (stop - start) * 1e3, left=start * 1e3, height=0.8, color=COLOURS[kind],
                        edgecolor="black", linewidth=0.4, hatch="//" if second else None)
                if (stop - start) / end > 0.012:
                    ax.text((start + stop) / 2 * 1e3, rank, str(mbi), ha="center", va="center", fontsize=7,
                            color="white")
        ax.set_yticks(range(len(ranks)), [f"rank {r}" for r in range(len(ranks))])
        ax.invert_yaxis()
        ax.set_xlim(0, end * 1e3)
        busy = [r[name]["busy"][-1] / r[name]["last"] for r in ranks]
        ax.set_title(f"{name}: step {end * 1e3:.0f} ms, bubble per rank "
                     + ", ".join(f"{1 - b:.1%}" for b in busy), fontsize=9, loc="left")
    axes[-1, 0].set_xlabel("time in step (ms)")
    legend = [Patch(color=c, label={"F": "forward", "B": "backward", "I": "input grad", "W": "weight grad",
                                     "L": "loss"}[k]) for k, c in COLOURS.items()]
    legend.append(Patch(facecolor="white", edgecolor="black", hatch="//", label="2nd virtual stage"))
    fig.legend(handles=legend, loc="upper right", ncol=6, fontsize=8)
    fig.suptitle(f"One pipeline step, p={p}, m={m} (number = micro-batch)", x=0.01, ha="left", fontsize=10)
    fig.tight_layout(rect=(0, 0, 1, 0.97))
    fig.savefig(path, dpi=110)
    plt.close(fig)


def throughput(args: argparse.Namespace) -> None:
    p, m = args.pp, args.microbatches
    if args.device == "cuda" and torch.cuda.device_count() < p:
        print(f"skipped: --device cuda needs {p} GPUs, found {torch.cuda.device_count()}")
        return
    load = os.getloadavg()[0]
    single = _single_process(args)
    with tempfile.TemporaryDirectory() as tmp:
        mp.start_processes(_pipeline_rank, args=(p, f"{tmp}/store", tmp, args), nprocs=p, start_method="spawn")
        ranks = [json.load(open(f"{tmp}/rank{r}.json")) for r in range(p)]
    bound = p * m / (m + p - 1)
    cfg = _config(args).model
    threads = "1 thread per process (baseline too)" if args.device == "cpu" else "actions synchronised"
    print(f"model {args.config or 'default'}: d_model {cfg.d_model}, {cfg.n_layers} layers, vocab "
          f"{cfg.vocab_size}; seq {args.seq}, micro-batch {args.micro_batch}, p={p}, m={m}, {args.device}, "
          f"{threads}")
    print(f"{os.cpu_count()} CPUs, 1-min load average {load:.2f} before and {os.getloadavg()[0]:.2f} after "
          f"(other work on the cores shows in 'compute x')")
    print(f"one process: {single * 1e3:.0f} ms/step (fwd+bwd of {m * args.micro_batch} sequences)")
    print(f"GPipe bound on the speed-up p m/(m+p-1) = {bound:.3f}; goal >= 0.85 of it for gpipe")
    print("ms/step, bubble (mean and max over ranks) and busy ms: medians over the timed steps; ideal: equal "
          "stages, free communication")
    print(f"{'schedule':<18}{'cuts':>12}{'ms/step':>9}{'speed-up':>10}{'of bound':>10}"
          f"{'bubble':>8}{'max':>7}{'ideal':>7}{'p(1-b)':>8}{'of bound':>9}{'compute x':>10}  busy ms per rank")
    for schedule, virtual in SCHEDULES:
        t = max(_median(r[schedule]["times"]) for r in ranks)
        bubbles = [_median([1 - b / s for b, s in zip(r[schedule]["busy"], r[schedule]["times"])]) for r in ranks]
        speed = single / t
        busy = [_median(r[schedule]["busy"]) for r in ranks]
        parallel = p * (1 - sum(bubbles) / p)
        print(f"{schedule:<18}{str(ranks[0][schedule]['cuts']):>12}{t * 1e3:>9.0f}{speed:>10.2f}"
              f"{speed / bound:>10.1%}{sum(bubbles) / p:>8.1%}{max(bubbles):>7.1%}"
              f"{ideal_bubble(schedule, p, m, virtual):>7.1%}{parallel:>8.2f}{parallel / bound:>9.1%}"
              f"{sum(busy) / single:>10.2f}  " + " ".join(f"{b * 1e3:.0f}" for b in busy))
    print("p(1-b): ranks busy at once (the speed-up if the stages computed as fast as one process); "
          "compute x: the ranks' summed busy time / one process (> 1: contention for cores or stage overhead; "
          "speed-up = p(1-b) / compute x)")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    png = out / f"timeline_p{p}_m{m}_{args.device}.png"
    _timeline(ranks, png, p, m)
    print(f"timeline: {png}")


def _memory_rank(rank: int, world: int, store: str, out_dir: str, args: argparse.Namespace) -> None:
    """One rank of the memory run: build its stage, one GPipe step and one AdamW step."""
    from torch.distributed.pipelining import PipelineStage

    from parallel.pipeline.schedule import PipelineLoss, build_schedule, step
    from parallel.pipeline.split import plan_split
    from parallel.pipeline.stage import build_stage

    torch.set_num_threads(1)
    base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    dist.init_process_group("gloo", store=dist.FileStore(store, world), rank=rank, world_size=world)
    args.overrides = [*args.overrides]
    cfg = _config(args, "gpipe", 1, world)
    cuts = list(plan_split(cfg.model, cfg.parallel, args.seq, 1).cuts)
    cuts = cuts if cuts[:1] == [0] else [0, *cuts]  # plan_split omits the first stage's 0
    mod = build_stage(cfg.model, cuts, rank, 0, torch.device("cpu"))
    built = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    stage = PipelineStage(mod, rank, world, torch.device("cpu"))
    loss_fn = PipelineLoss(mod.out_keys if mod.is_last else [], world)
    sched = build_schedule("gpipe", [stage], world, loss_fn)
    # foreach would add a temporary copy; plain SGD keeps no state (weights + gradients only)
    opt = (torch.optim.AdamW(mod.parameters(), lr=1e-4, foreach=False) if args.optimizer == "adamw"
           else torch.optim.SGD(mod.parameters(), lr=1e-4, foreach=False))
    inputs, labels = _batch(cfg.model.vocab_size, world, args.seq, torch.device("cpu"))
    start = time.perf_counter()
    step(sched, loss_fn, inputs if mod.is_first else None, labels if mod.is_last else None)
    opt.step()
    params = sum(p.numel() for p in mod.parameters())
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    with open(f"{out_dir}/mem{rank}.json", "w") as f:
        json.dump({"base": base, "built": built, "peak": peak, "params": params,
                   "seconds": time.perf_counter() - start, "cuts": cuts}, f)
    dist.barrier()
    dist.destroy_process_group()


def _available_gib() -> float:
    with open("/proc/meminfo") as f:
        fields = dict(line.split(":", 1) for line in f)
    return int(fields["MemAvailable"].split()[0]) / 2**20


def memory(args: argparse.Namespace) -> None:
    from parallel.pipeline.split import plan_split

    args.config = args.memory_config
    args.seq = 32
    total = sum(s.params for s in plan_split(_config(args).model, _config(args).parallel, 32).stages)
    print(f"{args.config}: {total / 1e9:.3f} B parameters, seq 32, micro-batch 1, m = pp, GPipe + {args.optimizer}, "
          f"fp32, 1 thread per process; peak RSS = getrusage ru_maxrss")
    per_param = 16 if args.optimizer == "adamw" else 8
    for pp in args.memory_pp:
        need = (per_param * total + pp * 1.1 * 2**30) / 2**30  # ~1 GiB/rank measured beyond the bytes
        avail = _available_gib()
        if need + 1 > avail:
            print(f"pp={pp}: skipped, needs about {need:.1f} GiB with {args.optimizer}, {avail:.1f} GiB available "
                  f"(try --optimizer sgd: AdamW's two moments add 8 B/param to each rank's peak)")
            continue
        with tempfile.TemporaryDirectory() as tmp:
            mp.start_processes(_memory_rank, args=(pp, f"{tmp}/store", tmp, args), nprocs=pp,
                               start_method="spawn")
            rows = [json.load(open(f"{tmp}/mem{r}.json")) for r in range(pp)]
        print(f"pp={pp}: cuts {rows[0]['cuts']}")
        for r, row in enumerate(rows):
            est = per_param * row["params"] / 2**30
            print(f"  rank {r}: {row['params'] / 1e6:7.1f} M params, after build {row['built'] / 2**20:6.2f} GiB, "
                  f"peak {row['peak'] / 2**20:6.2f} GiB ({per_param} B/param = {est:5.2f} GiB), step {row['seconds']:.1f} s"
                  + (f"; with AdamW ~{row['peak'] / 2**20 + 8 * row['params'] / 2**30:.2f} GiB (+ 8 B/param)"
                     if args.optimizer == "sgd" else ""))
        print(f"  max / rank {max(r['peak'] for r in rows) / 2**20:.2f} GiB, sum {sum(r['peak'] for r in rows) / 2**20:.2f} GiB")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="configs/llama_tiny.toml")
    parser.add_argument("--set", dest="overrides", action="append", default=[])
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--pp", type=int, default=2)
    parser.add_argument("--microbatches", type=int, default=8)
    parser.add_argument("--micro-batch", type=int, default=2)
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--out", default="runs/bench-pipeline")
    parser.add_argument("--memory", action="store_true", help="peak RSS per rank instead of throughput")
    parser.add_argument("--memory-config", default="configs/sambay_d16.toml")
    parser.add_argument("--memory-pp", type=int, nargs="+", default=[1, 2, 4])
    parser.add_argument("--optimizer", choices=["adamw", "sgd"], default="adamw", help="of the --memory step")
    args = parser.parse_args()
    if not args.memory and not any(o.startswith("model.vocab_size") for o in args.overrides):
        args.overrides.append("model.vocab_size=4096")  # llama_tiny takes its vocabulary from data
    memory(args) if args.memory else throughput(args)


if __name__ == "__main__":
    from pretrain.config import ConfigError

    try:
        main()
    except ConfigError as exc:
        print(f"{sys.argv[0]}: error: {exc}", file=sys.stderr)
        sys.exit(2)
