"""Decoding speed against the memory-traffic bound: SambaY vs a Transformer vs transformers' Llama.

    python bench/decode.py [--contexts 1024 4096 16384 32768] [--steps 24] [--budget-gib 4] [--quick]
                           [--device cuda --dtype bfloat16]

Models (issue 13's shapes): d_model 256, 16 layers, 4 query heads / 1 KV head of 64, window 128,
SwiGLU 1024, vocabulary 4096, fp32 on the CPU. SambaY is configs/sambay_d16.toml's pattern at
that width; the Transformer is 16 'attn:mlp' blocks with RoPE; HF Llama is
``LlamaForCausalLM`` of the same shapes with its ``DynamicCache``. ``--d-model`` widens both
(heads of 64, 4:1 GQA, SwiGLU 4 x d_model): at 256 a layer's weights are 3.8 MB, read in about
50 us, so the ~25 operators of a layer cost more than its bytes; at 1024 the bytes dominate.

Each context's caches are filled with random keys/values (decoding time does not depend on their
values), then ``--steps`` one-token steps are timed alternately over the contenders, repeated;
medians are reported. The bound of one step is the bytes it must read divided by the read
bandwidth measured in the same run (a ``sum`` over 512 MiB, probed before every timed run: the
median of a row's probes): every weight once (the tied or
untied head included), the keys/values each attention layer reads (a full layer all of them,
a window layer its window, each cross-attention layer the shared ones again), and each recurrent
state read and written. ``x bound`` is measured / bound: 1.0 is the hardware's limit.

Our models decode through their one-token paths (batch 1 on the CPU: the fused, thread-split
projections of pretrain/models/layers/decode_weights.py and, from 4K keys, the blocked attention
of ``attention.decode_attention``). ``--bandwidth-mib`` sizes the bandwidth probe (the smoke
test in tests/bench uses a small one).

Fixed memory budget: the largest batch whose caches fit ``--budget-gib`` at the context, and the
tokens/s summed over that batch (SambaY holds one K/V instead of sixteen).

``--device cuda`` runs the same tables on a GPU (``--dtype bfloat16`` for its usual precision):
models, caches and the bandwidth probe on the device, each timed run between two
``torch.cuda.synchronize()``; bench/cuda.py runs it so at 32K.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repository, before bench/ (bench/kernels.py)

from pretrain.config import load_config  # noqa: E402
from pretrain.models import build_model  # noqa: E402
from pretrain.models.layers.attention import Attention, KVState  # noqa: E402

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


def shapes(d_model: int = 256) -> list[str]:
    """Issue 13's shapes at ``d_model`` 256: 4 query heads / 1 KV head of 64, SwiGLU 4 x d_model,
    window 128, vocabulary 4096, untied. Another width keeps the head size and the 4:1 GQA
    (``d_model / 64`` query heads)."""
    heads = d_model // 64
    return [f"model.d_model={d_model}", f"model.ffn_hidden={4 * d_model}", "model.vocab_size=4096",
            "data.vocab_size=4096", f"model.attention.n_heads={heads}",
            f"model.attention.n_kv_heads={max(1, heads // 4)}", "model.attention.head_dim=64",
            "model.attention.window=128", "model.tie_embeddings=false"]


def build(kind: str, d_model: int = 256, device: str = "cpu", dtype: torch.dtype = torch.float32) -> torch.nn.Module:
    extra = ["model.layer_pattern='attn'", "model.attention.pos_encoding='rope'"] if kind == "transformer" else []
    cfg = load_config("configs/sambay_d16.toml", shapes(d_model) + extra)
    torch.manual_seed(0)
    return build_model(cfg.model).to(device=device, dtype=dtype).eval()


def synchronize(device: torch.device) -> None:
    """Wait for the device's queued work (a no-op on the CPU)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def build_hf_llama(model: torch.nn.Module):
    from transformers import LlamaConfig, LlamaForCausalLM

    blk = model.blocks["0"].mixer
    d_model, heads = model.cfg.d_model, model.cfg.attention.n_heads
    cfg = LlamaConfig(vocab_size=model.cfg.vocab_size, hidden_size=d_model, intermediate_size=4 * d_model,
                      num_hidden_layers=len(model.blocks), num_attention_heads=heads,
                      num_key_value_heads=model.cfg.attention.n_kv_heads, head_dim=blk.head_dim,
                      max_position_embeddings=65536, attn_implementation="sdpa")
    torch.manual_seed(0)
    weight = model.embed.weight
    return LlamaForCausalLM(cfg).to(device=weight.device, dtype=weight.dtype).eval()


def fill_cache(model: torch.nn.Module, batch: int, context: int, steps: int):
    """A cache as after ``context`` tokens: random K/V in every attention state, zero recurrent
    states, room for ``steps`` more tokens."""
    cache = model.new_cache(batch)
    for name, block in model.blocks.items():
        state = cache.states[name]
        if isinstance(state, KVState):
            window = block.mixer.window
            state.reserve(context + steps + 1, window)
            n = context if window is None else window
            state.k[:, :, :n].normal_()
            state.v[:, :, :n].normal_()
            state.length = context
    cache.offset = context
    return cache


def fill_hf_cache(hf, batch: int, context: int):
    from transformers import DynamicCache

    c = hf.config
    cache = DynamicCache(config=c)
    weight = hf.model.embed_tokens.weight
    for layer in range(c.num_hidden_layers):
        kv = torch.randn(batch, c.num_key_value_heads, context, c.head_dim, device=weight.device, dtype=weight.dtype)
        cache.update(kv, kv.clone(), layer)
    return cache


def traffic_bytes(model: torch.nn.Module, cache, context: int, batch: int) -> int:
    """Bytes one decoding step must read: weights, the keys/values each layer attends to, and each
    recurrent state (read and written)."""
    total = sum(p.numel() * p.element_size() for p in model.parameters())
    shared = 0
    for name, block in model.blocks.items():
        mixer, state = block.mixer, cache.states[name]
        if isinstance(state, KVState):
            keys = context if mixer.window is None else min(context, mixer.window)
            row = state.k[0, :, 0].numel() * state.k.element_size()  # one token: [H_kv, D]
            total += 2 * batch * keys * row
            if mixer.window is None:
                shared = 2 * batch * keys * row
        elif isinstance(mixer, Attention):  # a cross-attention layer reads the shared K/V again
            total += shared
        elif state is not None:
            total += 2 * sum(t.numel() * t.element_size() for t in vars(state).values() if isinstance(t, torch.Tensor))
    return total


def cache_bytes(model: torch.nn.Module, context: int) -> int:
    """Cache bytes of one sequence at ``context`` tokens."""
    cache = fill_cache(model, 1, context, 0)
    total = 0
    for state in cache.states.values():
        if isinstance(state, KVState):
            total += 2 * state.k.numel() * state.k.element_size()
        elif state is not None:
            total += sum(t.numel() * t.element_size() for t in vars(state).values() if isinstance(t, torch.Tensor))
    return total


def read_bandwidth(mib: int = 512, repeats: int = 5, device: torch.device = torch.device("cpu")) -> float:
    """Bytes/s of a sum over ``mib`` MiB of fp32 on ``device`` (the median of ``repeats``)."""
    x = torch.ones(mib * 2**18, device=device)
    x.sum()  # the pages are touched before timing
    times = []
    for _ in range(repeats):
        synchronize(device)
        t = time.perf_counter()
        x.sum()
        synchronize(device)
        times.append(time.perf_counter() - t)
    return x.numel() * 4 / statistics.median(times)


class Bandwidth:
    """Read-bandwidth probes taken between the timed runs (a shared machine's bandwidth drifts
    by tens of percent over minutes): each :meth:`probe` is :func:`read_bandwidth` once, and a
    row's bound divides by the median of the probes taken while its contenders ran."""

    def __init__(self, mib: int, device: torch.device = torch.device("cpu")) -> None:
        self.mib, self.device = mib, device
        self.samples: list[float] = []

    def probe(self) -> None:
        self.samples.append(read_bandwidth(self.mib, repeats=1, device=self.device))

    def since(self, start: int) -> float:
        """Median bytes/s of the probes from index ``start`` on."""
        return statistics.median(self.samples[start:])


@torch.inference_mode()  # as pretrain.generate decodes (HF's Llama too: the same mode for every contender)
def step_seconds(contenders: dict, steps: int, repeats: int, bandwidth: Bandwidth | None = None,
                 device: torch.device = torch.device("cpu")) -> dict[str, float]:
    """Median seconds per one-token step of each contender, run alternately; with
    ``bandwidth`` a probe before every contender's timed run."""
    out: dict[str, list[float]] = {k: [] for k in contenders}
    for _ in range(repeats):
        for name, run in contenders.items():
            if bandwidth is not None:
                bandwidth.probe()
            run(2)  # warm up (and refill after the previous repeat)
            synchronize(device)
            t = time.perf_counter()
            run(steps)
            synchronize(device)
            out[name].append((time.perf_counter() - t) / steps)
    return {k: statistics.median(v) for k, v in out.items()}


def ours(model, batch: int, context: int, steps: int):
    state = {}

    def run(n: int) -> None:
        if n == 2 or "cache" not in state:  # a fresh cache per timed repeat: same context each time
            state["cache"] = fill_cache(model, batch, context, steps + 2)
        tok = torch.zeros(batch, 1, dtype=torch.long, device=model.embed.weight.device)
        for _ in range(n):
            model(tok, cache=state["cache"])
    return run


def _hf_cache_argument() -> str:
    """The name of the cache argument of ``LlamaForCausalLM.forward``: ``cache`` from the
    transformers versions that deprecate ``past_key_values`` on."""
    import inspect

    from transformers import LlamaForCausalLM

    return "cache" if "cache" in inspect.signature(LlamaForCausalLM.forward).parameters else "past_key_values"


def hf(model, batch: int, context: int):
    state = {}
    cache_arg = _hf_cache_argument()

    def run(n: int) -> None:
        if n == 2 or "cache" not in state:
            state["cache"] = fill_hf_cache(model, batch, context)
        tok = torch.zeros(batch, 1, dtype=torch.long, device=model.model.embed_tokens.weight.device)
        for _ in range(n):
            model(input_ids=tok, **{cache_arg: state["cache"]}, use_cache=True)
    return run


def plot(contexts: list[int], curves: dict[str, list[float]], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = {"sambay": "SambaY", "transformer": "Transformer", "hf": "HF Llama"}
    fig, ax = plt.subplots(figsize=(7, 4), dpi=110)
    for key, values in curves.items():
        bound = key.endswith("bound")
        label = f"{names[key.split()[0]]} bound" if bound else names[key]
        ax.plot(contexts, values, "--" if bound else "o-", label=label, lw=1 if bound else 1.5)
    ax.set_xscale("log", base=2)
    ax.set_xlabel("context (tokens)")
    ax.set_ylabel("ms per token, batch 1")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path)
    print(f"plot: {path}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--contexts", type=int, nargs="+", default=[1024, 4096, 16384, 32768])
    p.add_argument("--steps", type=int, default=24)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--budget-gib", type=float, default=4.0)
    p.add_argument("--no-hf", action="store_true", help="skip transformers' Llama")
    p.add_argument("--quick", action="store_true", help="fewer steps and repeats")
    p.add_argument("--bandwidth-mib", type=int, default=512, help="size of the read-bandwidth probe")
    p.add_argument("--d-model", type=int, default=256,
                   help="model width (issue 13's is 256; wider models read more bytes per operator)")
    p.add_argument("--plot", help="write a PNG of ms per token against context (with the bounds) here")
    p.add_argument("--device", default="cpu", help="cpu (default) or cuda")
    p.add_argument("--dtype", default="float32", choices=sorted(DTYPES), help="weights and caches")
    args = p.parse_args()
    if args.device not in ("cpu", "cuda"):
        p.error(f"--device: {args.device!r} is not cpu or cuda")
    if args.device == "cuda" and not torch.cuda.is_available():
        p.error("--device: 'cuda' requested but CUDA is not available")
    if args.quick:
        args.steps, args.repeats = 8, 2
    torch.set_grad_enabled(False)
    device, dtype = torch.device(args.device), DTYPES[args.dtype]
    sambay, transformer = (build(kind, args.d_model, device, dtype) for kind in ("sambay", "transformer"))
    llama = None if args.no_hf else build_hf_llama(transformer)
    probes = Bandwidth(args.bandwidth_mib, device)
    where = torch.cuda.get_device_name(device) if device.type == "cuda" else f"{torch.get_num_threads()} threads"
    print(f"{where}, {args.dtype}, d_model {args.d_model}; the bound of each row divides by the median read "
          "bandwidth probed between its timed runs (GB/s column)\n")
    print("## Batch 1: ms per token (x bound)\n")
    print("| context | SambaY | bound | Transformer | bound | HF Llama | SambaY/Transformer | bound ratio | ours/HF | GB/s |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    curves: dict[str, list[float]] = {}
    for ctx in args.contexts:
        runs = {"sambay": ours(sambay, 1, ctx, args.steps), "transformer": ours(transformer, 1, ctx, args.steps)}
        if llama is not None:
            runs["hf"] = hf(llama, 1, ctx)
        first = len(probes.samples)
        sec = step_seconds(runs, args.steps, args.repeats, probes, device)
        bw = probes.since(first)
        b_s = traffic_bytes(sambay, fill_cache(sambay, 1, ctx, 0), ctx, 1) / bw
        b_t = traffic_bytes(transformer, fill_cache(transformer, 1, ctx, 0), ctx, 1) / bw
        for key, value in (*sec.items(), ("sambay bound", b_s), ("transformer bound", b_t)):
            curves.setdefault(key, []).append(value * 1e3)
        hf_ms = f"{sec['hf'] * 1e3:.2f}" if "hf" in sec else "-"
        vs_hf = f"{sec['hf'] / sec['transformer']:.2f}x" if "hf" in sec else "-"
        print(f"| {ctx} | {sec['sambay'] * 1e3:.2f} ({sec['sambay'] / b_s:.1f}x) | {b_s * 1e3:.2f} "
              f"| {sec['transformer'] * 1e3:.2f} ({sec['transformer'] / b_t:.1f}x) | {b_t * 1e3:.2f} | {hf_ms} "
              f"| {sec['transformer'] / sec['sambay']:.2f}x | {b_t / b_s:.2f}x | {vs_hf} | {bw / 1e9:.1f} |")

    if args.plot:
        plot(args.contexts, curves, args.plot)
    budget = args.budget_gib * 2**30
    print(f"\n## Fixed cache budget {args.budget_gib:g} GiB: largest batch, tokens/s summed over it\n")
    print("| context | SambaY batch | tok/s (x bound) | Transformer batch | tok/s (x bound) | throughput ratio | bound ratio | GB/s |")
    print("|---|---|---|---|---|---|---|---|")
    for ctx in [c for c in args.contexts if c >= 16384] or args.contexts[-1:]:
        # one bandwidth for both models (the median of the row's probes): the bound ratio is then
        # the bytes' ratio alone, whatever the probes of each model's runs gave
        first, row = len(probes.samples), []
        for model in (sambay, transformer):
            batch = max(1, int(budget // cache_bytes(model, ctx)))
            sec = step_seconds({"m": ours(model, batch, ctx, args.steps)}, args.steps, args.repeats, probes, device)["m"]
            row.append((batch, batch / sec, traffic_bytes(model, fill_cache(model, 1, ctx, 0), ctx, batch)))
        bw = probes.since(first)
        (bs, ts, bytes_s), (bt, tt, bytes_t) = row
        cs, ct = bs * bw / bytes_s, bt * bw / bytes_t  # tokens/s at the bound
        print(f"| {ctx} | {bs} | {ts:.0f} ({ts / cs:.2f} of bound) | {bt} | {tt:.0f} ({tt / ct:.2f} of bound) "
              f"| {ts / tt:.1f}x | {cs / ct:.1f}x | {bw / 1e9:.0f} |")
    print("\nThe SambaY paper reports up to 10x the Transformer's decoding throughput at 32K tokens (vLLM, "
          "large batches, GPU); the ratios above are the same comparison at these shapes on this machine, "
          "and the bound ratio is the most these cache sizes allow.")


if __name__ == "__main__":
    main()
