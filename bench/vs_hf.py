"""Training throughput against Hugging Face: our model and transformers' class of the same family
holding the same weights, forward + backward + AdamW, fp32, side by side.

    python bench/vs_hf.py [--families llama mamba mamba2] [--steps 4] [--repeats 3] [--set k=v ...]

Families (pretrain/convert/families.py builds the transformers model from our config and copies
our weights, so widths, depths, heads, vocabulary and initial values are identical):
``llama`` (configs/llama_tiny.toml vs LlamaForCausalLM), ``mamba`` (configs/tiny.toml as
'mamba:none' blocks vs MambaForCausalLM, its PyTorch path), ``mamba2`` (configs/mamba2_tiny.toml
vs Mamba2ForCausalLM, its PyTorch path). Both run the same batch of the config's micro-batch x
sequence length with ``torch.optim.AdamW`` (foreach); ours computes the loss with its fused
chunked head (``labels=``), transformers with its own (it shifts the T labels, so it scores one
token fewer per row). The contenders run alternately, ``--repeats`` times ``--steps`` steps;
medians. ``ours/HF`` > 1 means we are faster; ``MFU`` is ours against the measured fp32 GEMM
rate (the bound a dense step can reach on this device).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repository, before bench/ (bench/kernels.py)

from pretrain.config import ConfigError, load_config  # noqa: E402
from pretrain.convert import build_hf_model, native_family  # noqa: E402
from pretrain.models import build_model, flops_per_token  # noqa: E402
from pretrain.train.mfu import peak_flops  # noqa: E402

FAMILIES = {
    "llama": ("configs/llama_tiny.toml", []),
    "mamba": ("configs/tiny.toml", ["model.layer_pattern='mamba:none'"]),
    "mamba2": ("configs/mamba2_tiny.toml", []),
}


def contenders(family: str, overrides: list[str]):
    path, extra = FAMILIES[family]
    cfg = load_config(path, extra + overrides)
    cfg.model.vocab_size = cfg.data.vocab_size
    if native_family(cfg.model) != family:
        raise ConfigError(f"{path}: exports as {native_family(cfg.model)}, not {family}")
    torch.manual_seed(0)
    ours = build_model(cfg.model)
    state = {k: v.detach().clone() for k, v in ours.state_dict().items()}
    hf = build_hf_model(family, cfg.model, state, eos_id=0, max_positions=cfg.data.seq_len).train()
    b, t = cfg.train.micro_batch_size, cfg.data.seq_len
    x = torch.randint(0, cfg.model.vocab_size, (b, t + 1), generator=torch.Generator().manual_seed(0))

    def stepper(model, loss_fn):
        opt = torch.optim.AdamW(model.parameters(), lr=1e-4, foreach=True)

        def step() -> None:
            loss_fn(model).backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
        return step

    runs = {
        "ours": stepper(ours.train(), lambda m: m(x[:, :-1], labels=x[:, 1:])),
        "hf": stepper(hf, lambda m: m(input_ids=x[:, :-1], labels=x[:, :-1]).loss),
    }
    return cfg, runs, b * t


def timed(runs: dict, steps: int, repeats: int) -> dict[str, float]:
    """Median seconds per step of each contender, alternating."""
    for run in runs.values():
        run()  # warm-up: allocations, optimizer state
    out: dict[str, list[float]] = {k: [] for k in runs}
    for _ in range(repeats):
        for name, run in runs.items():
            t = time.perf_counter()
            for _ in range(steps):
                run()
            out[name].append((time.perf_counter() - t) / steps)
    return {k: statistics.median(v) for k, v in out.items()}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--families", nargs="+", default=list(FAMILIES), choices=list(FAMILIES))
    p.add_argument("--steps", type=int, default=4)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--set", dest="overrides", action="append", default=[])
    args = p.parse_args()
    peak, source = peak_flops(torch.device("cpu"), 0.0)
    print(f"fp32 GEMM rate {peak / 1e9:.1f} GFLOP/s ({source}), {torch.get_num_threads()} threads\n")
    print("| family | tokens/step | ours s/step | HF s/step | ours/HF | ours MFU |")
    print("|---|---|---|---|---|---|")
    for family in args.families:
        cfg, runs, tokens = contenders(family, args.overrides)
        sec = timed(runs, args.steps, args.repeats)
        mfu = flops_per_token(cfg.model, cfg.data.seq_len)["total"] * tokens / sec["ours"] / peak
        print(f"| {family} | {tokens} | {sec['ours']:.3f} | {sec['hf']:.3f} | {sec['hf'] / sec['ours']:.2f}x | {mfu:.1%} |")


if __name__ == "__main__":
    try:
        main()
    except ConfigError as exc:
        print(f"{sys.argv[0]}: error: {exc}", file=sys.stderr)
        sys.exit(2)
