"""`pretrain prepare|train|generate|convert|eval|plan` — the command line.

User errors (a bad config field, a missing file, a damaged checkpoint) print one line on
stderr and exit with code 2; they never show a traceback. Under torchrun every rank exits with 2,
and a config error (the same on every rank) is printed by the first rank of each node only.

`pretrain launch slurm` checks a multi-node job and renders, prints and submits its sbatch
script (pretrain/launch.py).
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from pretrain.config import ConfigError, load_config

EXIT_USAGE = 2


def _add_config_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("config", nargs="?", help="TOML config (default: configs/tiny.toml values built in)")
    p.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="SECTION.FIELD=VALUE",
        help="override a config field (repeatable), e.g. --set train.max_steps=100",
    )


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="pretrain", description="Pretrain hybrid decoder language models.")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("prepare", help="tokenize the configured corpus into indexed token shards")
    _add_config_args(p)
    p.add_argument("--force", action="store_true", help="prepare again even if the data dir is up to date")

    p = sub.add_parser("train", help="train a config (prepares the data first when missing)")
    _add_config_args(p)
    p.add_argument(
        "--resume",
        default="auto",
        help="'auto' (newest complete checkpoint of the run, if any), 'none', or a checkpoint folder",
    )
    p.add_argument(
        "--init-from",
        metavar="CHECKPOINT",
        help="start a new run from the model weights of this checkpoint (fresh optimizer, schedule and "
        "data order), e.g. at another data.seq_len; ignored once the run has checkpoints of its own",
    )

    p = sub.add_parser("generate", help="sample text from a checkpoint")
    p.add_argument("--checkpoint", required=True, help="a run folder, its checkpoints folder or one step folder")
    p.add_argument("--prompt", default="", help="text to continue")
    p.add_argument("--max-new-tokens", type=int, default=100, help="tokens to add (0: print the prompt)")
    p.add_argument("--temperature", type=float, default=0.8, help="0 means greedy; inf: uniform")
    p.add_argument("--top-k", type=int, default=0, help="keep the k most likely tokens (0: all)")
    p.add_argument("--top-p", type=float, default=0.95, help="nucleus sampling mass (1: off; 0: the most likely token)")
    p.add_argument("--greedy", action="store_true", help="always take the most likely token")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--num-samples", type=int, default=1)

    p = sub.add_parser(
        "convert",
        help="export a checkpoint as a Hugging Face folder (--to hf) or import one into a run folder (--from hf)",
    )
    p.add_argument("source", help="a checkpoint (run, checkpoints or step folder) with --to; a Hugging Face folder with --from")
    p.add_argument("out", help="the folder to write (must not exist)")
    direction = p.add_mutually_exclusive_group(required=True)
    direction.add_argument("--to", choices=["hf"], help="export to this format")
    direction.add_argument("--from", dest="from_format", choices=["hf"], help="import from this format")
    p.add_argument(
        "--native-only", action="store_true",
        help="export only to a native transformers class (Llama, Mistral, Mixtral, DiffLlama, Mamba, Mamba-2): "
        "refuse the other families instead of bundling our model code (trust_remote_code)",
    )
    p.add_argument(
        "--remote-code", action="store_true",
        help="bundle our model code into the folder (load with trust_remote_code=True) even where a native "
        "class exists; the families without one always export this way",
    )
    p.add_argument("--max-shard-size", default="5GB", help="safetensors shard size of an export, e.g. 2GB")
    p.add_argument(
        "--set", dest="overrides", action="append", default=[], metavar="SECTION.FIELD=VALUE",
        help="with --from: override a field of the imported run's config (e.g. data.sources), repeatable",
    )

    p = sub.add_parser(
        "eval",
        help="perplexity and bits per byte of a checkpoint on its validation split, or with --tasks "
        "lm-evaluation-harness on its Hugging Face export; results under <run dir>/eval/",
    )
    p.add_argument("--checkpoint", required=True, help="a run folder, its checkpoints folder or one step folder")
    p.add_argument(
        "--samples", type=int, default=0,
        help="without --tasks: validation sequences to score (0: the config's train.eval_samples)",
    )
    p.add_argument(
        "--tasks", default=None,
        help="comma-separated lm-eval tasks, e.g. kjv_chapter_ppl,kjv_verse_choice (shipped, offline) "
        "or any task lm-eval has cached",
    )
    p.add_argument("--limit", type=int, default=0, help="with --tasks: documents per task (0: all)")
    p.add_argument("--device", default="cpu", help="torch device to evaluate on, e.g. cpu or cuda")
    p.add_argument("--json", action="store_true", help="print the results as JSON instead of a line or table")

    p = sub.add_parser(
        "plan",
        help="layer pattern, parameters, FLOPs per token, memory per device and, with parallel.pp > 1, "
        "the pipeline split per stage",
    )
    _add_config_args(p)
    p.add_argument("--dp", type=int, default=1, help="data-parallel ranks to estimate memory and the batch for")

    p = sub.add_parser("bench", help="run the benchmarks of bench/ side by side into one report "
                       "(decoding, training vs Hugging Face, cost vs length, data, pipeline, kernels)")
    p.add_argument("--quick", action="store_true", help="sizes that finish in under 10 minutes on a 2-core CPU")
    p.add_argument("--out", default="runs/bench", help="folder of report.md and the plots")
    p.add_argument("--only", nargs="+", metavar="NAME", help="run only these (decode vs_hf seq_cost data_loading pipeline kernels)")

    p = sub.add_parser("launch", help="launch a multi-node run (see launch/README.md)")
    targets = p.add_subparsers(dest="target", required=True)
    p = targets.add_parser(
        "slurm",
        help="check the config against nodes x GPUs, render launch/slurm.sbatch, print it and the commands, "
        "and submit it with sbatch",
    )
    _add_config_args(p)
    p.add_argument("--nodes", type=int, required=True, help="nodes (one torchrun agent each)")
    p.add_argument("--gpus-per-node", type=int, required=True, help="GPUs per node (one rank each)")
    p.add_argument("--partition", default="", help="slurm partition (default: the cluster's)")
    p.add_argument("--time", default="", help="time limit, e.g. 2-00:00:00 (default: the partition's)")
    p.add_argument("--account", default="", help="slurm account to charge")
    p.add_argument("--signal-seconds", type=int, default=300,
                   help="seconds before the time limit at which SIGUSR1 makes every rank checkpoint and exit, "
                   "and the job requeue itself")
    p.add_argument("--max-restarts", type=int, default=3,
                   help="torchrun restarts of all ranks after a rank fails (each resumes from the newest checkpoint)")
    p.add_argument("--port", type=int, default=29500, help="rendezvous port on the first node")
    p.add_argument("--dry-run", action="store_true", help="print the script and the commands; submit nothing")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    _enable_faulthandler()
    from pretrain.convert.families import ConvertError
    from pretrain.data import DataError
    from pretrain.train.checkpoint import CheckpointError
    from pretrain.train.trainer import DivergenceError

    try:
        return _COMMANDS[args.command](args)
    except ConfigError as exc:
        # every rank checks the same config against the same world size and fails alike: one
        # line per node, not one per rank; every rank still exits with 2
        if _lead_local_rank():
            print(f"pretrain {args.command}: error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except (DataError, CheckpointError, ConvertError) as exc:
        # may concern one rank's files only (its checkpoint shard, its node's data): every rank says
        print(f"pretrain {args.command}: error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except DivergenceError as exc:
        print(f"pretrain {args.command}: error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"pretrain {args.command}: interrupted", file=sys.stderr)
        return 130


def _lead_local_rank() -> bool:
    """Whether this process is the first rank on its node: LOCAL_RANK 0 as torchrun (or a
    launcher that sets it) numbers them, RANK 0 when only RANK is set, True without a launcher.
    Each node's log then holds the error once, even where nodes do not share one."""
    return os.environ.get("LOCAL_RANK", os.environ.get("RANK", "0")) == "0"


def _enable_faulthandler() -> None:
    """On a fatal signal (SIGSEGV, SIGABRT, SIGBUS, ...) print every thread's Python stack to
    stderr, so a crashed rank's log says where it died; left alone when already enabled (pytest)
    or when stderr is not a real file."""
    import faulthandler

    if faulthandler.is_enabled():
        return
    try:
        faulthandler.enable(all_threads=True)
    except (AttributeError, ValueError, OSError):  # io.UnsupportedOperation is an OSError
        pass


def _cmd_prepare(args) -> int:
    from pretrain.data import prepare

    cfg = load_config(args.config, args.overrides)
    prepare(cfg.data, force=args.force)
    return 0


def _cmd_train(args) -> int:
    from pretrain.train.trainer import train

    cfg = load_config(args.config, args.overrides)
    train(cfg, resume=args.resume, init_from=args.init_from)
    return 0


def _cmd_generate(args) -> int:
    import torch

    from pretrain.data import Tokenizer
    from pretrain.generate import SamplingError, generate
    from pretrain.train.checkpoint import CheckpointError, load_for_inference

    _check_generate_args(args)
    cfg, model, tok_path = load_for_inference(Path(args.checkpoint))
    tok = Tokenizer(str(tok_path))
    prompt = tok.encode(args.prompt) if args.prompt else []
    # Training documents follow an end-of-document token: start the prompt with one too.
    prompt = [tok.eos_id] + prompt
    if len(prompt) > cfg.data.seq_len:
        print(
            f"pretrain generate: note: the prompt is {len(prompt)} tokens, longer than the "
            f"{cfg.data.seq_len}-token sequences the model was trained on (data.seq_len)",
            file=sys.stderr,
        )
    gen = torch.Generator().manual_seed(args.seed)
    for i in range(args.num_samples):
        try:
            new = generate(
                model,
                prompt,
                args.max_new_tokens,
                temperature=args.temperature,
                top_k=args.top_k,
                top_p=args.top_p,
                greedy=args.greedy or args.temperature == 0,
                eos_id=tok.eos_id,
                generator=gen,
            )
        except SamplingError as exc:  # the arguments were checked: the model gave NaN/inf logits
            raise CheckpointError(f"{args.checkpoint}: {exc}") from None
        if args.num_samples > 1:
            print(f"--- sample {i + 1}")
        print(_continue_text(tok, args.prompt, prompt[1:], [t for t in new if t != tok.eos_id]), flush=True)
    return 0


def _continue_text(tok, typed: str, prompt: list[int], new: list[int]) -> str:
    """The prompt as typed, then the new tokens' text. Decoded together with the prompt (a
    piece's leading space survives only mid-text); the prompt's own decoding is replaced by what
    was typed, since characters outside the vocabulary decode to an unknown-piece mark."""
    whole, shown = tok.decode(prompt + new), tok.decode(prompt)
    return typed + whole[len(shown) :] if whole.startswith(shown) else whole


def _check_generate_args(args) -> None:
    """One-line errors (exit 2) for sampling flags out of range, before the model is loaded."""
    from pretrain.generate import SamplingError, check_sampling

    if args.max_new_tokens < 0:
        raise ConfigError(f"--max-new-tokens: must be >= 0, got {args.max_new_tokens}")
    if args.num_samples < 1:
        raise ConfigError(f"--num-samples: must be >= 1, got {args.num_samples}")
    if not 0 <= args.seed < 2**63:
        raise ConfigError(f"--seed: must be in [0, 2**63), got {args.seed}")
    try:
        check_sampling(args.temperature, args.top_k, args.top_p)
    except SamplingError as exc:
        raise ConfigError(f"--{exc.param.replace('_', '-')}{str(exc)[len(exc.param):]}") from None


def _cmd_convert(args) -> int:
    from pretrain.convert import ConvertError, export_hf, import_hf

    try:
        from transformers.utils import logging as hf_logging
    except ImportError:
        raise ConvertError("needs the transformers package: pip install 'transformers>=5'") from None

    hf_logging.disable_progress_bar()  # per-shard bars; the command prints one line when done
    if args.to:
        if args.overrides:
            raise ConfigError("--set: applies to an import (--from hf); an export keeps the checkpoint's config")
        family = export_hf(Path(args.source), Path(args.out), args.max_shard_size, args.native_only, args.remote_code)
        print(f"exported {args.source} as {family} ({_hf_class(family)}) to {args.out}")
    else:
        family = import_hf(Path(args.source), Path(args.out), args.overrides)
        print(f"imported {args.source} ({family}) to {args.out}; continue with: pretrain train {Path(args.out) / 'config.toml'}")
    return 0


def _hf_class(family: str) -> str:
    from pretrain.convert import HF_CLASSES
    from pretrain.convert.remote import REMOTE_CLASS, REMOTE_FAMILY

    return f"{REMOTE_CLASS}, trust_remote_code=True" if family == REMOTE_FAMILY else HF_CLASSES[family]


def _cmd_eval(args) -> int:
    import json

    from pretrain.eval import checkpoint_step, write_results
    from pretrain.train.checkpoint import resolve_checkpoint

    if args.samples < 0:
        raise ConfigError(f"--samples: must be >= 0, got {args.samples}")
    if args.limit < 0:
        raise ConfigError(f"--limit: must be >= 0, got {args.limit}")
    if args.tasks is None and args.limit:
        raise ConfigError("--limit: counts documents of --tasks; without --tasks nothing would use it")
    if args.tasks is not None and args.samples:
        raise ConfigError("--samples: counts validation sequences, which --tasks does not score; drop one")
    _check_device(args.device)
    step = resolve_checkpoint(Path(args.checkpoint))
    if args.tasks is not None:
        import contextlib

        from pretrain.eval import harness

        tasks = [t.strip() for t in args.tasks.split(",") if t.strip()]
        if not tasks:
            raise ConfigError(f"--tasks: no task name in {args.tasks!r}")
        # lm-eval and the libraries it imports (deepspeed's accelerator line) print to stdout:
        # keep stdout for the results (--json must parse)
        with contextlib.redirect_stdout(sys.stderr):
            results = harness.without_samples(harness.run_lm_eval(step, tasks, args.limit or None, args.device))
        out = write_results(step, "lm_eval", results)
        print(json.dumps(results, indent=2, default=str) if args.json else harness.table(results))
    else:
        from pretrain.eval.perplexity import perplexity

        result = {"step": checkpoint_step(step), **perplexity(step, args.samples or None, args.device)}
        out = write_results(step, "perplexity", result)
        if args.json:
            print(json.dumps(result, indent=2))
        else:
            print(
                f"validation loss {result['val_loss']:.4f} nats/token, perplexity {result['val_ppl']:.2f}, "
                f"{result['bits_per_byte']:.4f} bits/byte ({result['tokens']:,} tokens, {result['bytes']:,} bytes); "
                f"unigram baseline {result['unigram_entropy']:.4f}"
            )
    print(f"results written to {out}", file=sys.stderr)
    return 0


def _check_device(device: str) -> None:
    """ConfigError naming --device unless it names a device this torch can use."""
    import torch

    try:
        dev = torch.device(device)
    except RuntimeError:
        raise ConfigError(f"--device: {device!r} is not a torch device (e.g. cpu, cuda, cuda:1)") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"--device: {device!r}, but this torch sees no CUDA device")
    if dev.type not in ("cpu", "cuda"):
        raise ConfigError(f"--device: {device!r}; evaluation runs on cpu or cuda")


def _cmd_plan(args) -> int:
    from pretrain.plan import format_plan

    if args.dp < 1:
        raise ConfigError(f"--dp: must be >= 1, got {args.dp}")
    cfg = load_config(args.config, args.overrides)
    print(format_plan(cfg, dp=args.dp))
    return 0


def _cmd_launch(args) -> int:
    import shutil
    import subprocess

    from pretrain import launch

    job = launch.SlurmJob(
        args.config or "", args.nodes, args.gpus_per_node, args.overrides, args.partition, args.time,
        args.account, args.signal_seconds, args.max_restarts, args.port,
    )
    cfg = launch.check(job)
    if not args.dry_run and shutil.which("sbatch") is None:
        raise ConfigError("sbatch is not on PATH (not a slurm login node?); --dry-run prints the script only")
    script, path = launch.render(job, cfg), launch.script_path(cfg)
    print(script)
    for note in launch.layout_notes(cfg, job):
        print(note, file=sys.stderr)
    print(launch.describe(job, path, submit=not args.dry_run), flush=True)
    if args.dry_run:
        return 0
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(script)
    return subprocess.run(["sbatch", str(path)]).returncode


def _cmd_bench(args) -> int:
    from pretrain.bench_suite import run_suite

    return run_suite(Path(args.out), quick=args.quick, only=args.only)


_COMMANDS = {
    "prepare": _cmd_prepare,
    "train": _cmd_train,
    "generate": _cmd_generate,
    "convert": _cmd_convert,
    "eval": _cmd_eval,
    "plan": _cmd_plan,
    "bench": _cmd_bench,
    "launch": _cmd_launch,
}


if __name__ == "__main__":
    raise SystemExit(main())
