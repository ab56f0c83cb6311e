"""Shared fixtures: a small slice of the built-in corpus prepared once per session, and the
overrides that shrink any config to a model that trains in seconds."""

from __future__ import annotations

import os

# Triton kernels run under Triton's interpreter on CPU tensors in the tests. triton reads this
# when it is first imported (torch may import it from any test), so it is set here, before
# anything else; TRITON_INTERPRET=0 in the environment runs tests/kernels compiled on CUDA.
os.environ.setdefault("TRITON_INTERPRET", "1")

import importlib.util
import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def kjv_path() -> Path:
    spec = importlib.util.find_spec("bible")
    return Path(list(spec.submodule_search_locations)[0]) / "data" / "kjv.jsonl"


@pytest.fixture(scope="session")
def small_corpus(tmp_path_factory) -> Path:
    """The first chapters of the King James text as a jsonl file of one document per chapter."""
    out = tmp_path_factory.mktemp("corpus") / "kjv_small.jsonl"
    chapters: dict[tuple[str, int], list[str]] = {}
    with open(kjv_path()) as f:
        for line in f:
            verse = json.loads(line)
            key = (verse["book"], verse["chapter"])
            if key not in chapters and len(chapters) == 120:
                break
            chapters.setdefault(key, []).append(verse["text"])
    with open(out, "w") as f:
        for verses in chapters.values():
            f.write(json.dumps({"text": " ".join(verses)}) + "\n")
    return out


@pytest.fixture(scope="session")
def prepared_dir(small_corpus, tmp_path_factory) -> Path:
    """``small_corpus`` tokenized with a 256-token BPE vocabulary."""
    from pretrain.config import load_config
    from pretrain.data import prepare

    data_dir = tmp_path_factory.mktemp("prepared")
    cfg = load_config(None, data_overrides(small_corpus, data_dir))
    prepare(cfg.data, log=lambda *_: None)
    return data_dir


def data_overrides(corpus: Path, data_dir: Path) -> list[str]:
    return [
        f"data.sources=['{corpus}']",
        f"data.dir='{data_dir}'",
        "data.vocab_size=256",
        "data.seq_len=32",
        "data.valid_fraction=0.05",
        "data.num_workers=1",
    ]


def tiny_overrides(corpus: Path, data_dir: Path, run_dir: Path, **extra) -> list[str]:
    """A two-block Mamba + sliding-window model, 4 sequences of 32 tokens per step."""
    values = {
        "run.dir": f"'{run_dir}'",
        "model.d_model": 32,
        "model.n_layers": 2,
        "model.layer_pattern": "'mamba swa'",
        "model.attention.n_heads": 2,
        "model.attention.window": 16,
        "model.mamba.d_state": 4,
        "train.max_steps": 8,
        "train.global_batch_size": 4,
        "train.micro_batch_size": 2,
        "train.eval_interval": 4,
        "train.eval_samples": 4,
        "train.log_interval": 1,
        "optim.warmup_steps": 2,
        "checkpoint.interval": 2,
        "checkpoint.keep_last": 10,
        "logging.wandb": "disabled",
        "logging.progress": "off",
    }
    values.update(extra)
    return data_overrides(corpus, data_dir) + [f"{k}={v}" for k, v in values.items()]


def set_args(overrides: list[str]) -> list[str]:
    out = []
    for o in overrides:
        out += ["--set", o]
    return out


def run_cli(args: list[str], timeout: float = 300, **kwargs) -> subprocess.CompletedProcess:
    """``python -m pretrain ARGS`` in a fresh process (the way users run it)."""
    env = {**os.environ, "PYTHONPATH": str(ROOT), "WANDB_MODE": "disabled"}
    return subprocess.run(
        [sys.executable, "-m", "pretrain", *args], capture_output=True, text=True, timeout=timeout,
        env=env, cwd=kwargs.pop("cwd", ROOT), **kwargs,
    )


def losses(run_dir: Path) -> list[tuple[int, float]]:
    return [
        (r["step"], r["loss"])
        for r in map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines())
        if "loss" in r
    ]


def _process_tree(pid: int) -> list[int]:
    """``pid`` and its descendants (from /proc), parents first."""
    parent = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    parent[int(entry)] = int(f.read().rsplit(")", 1)[1].split()[1])
            except OSError:  # exited meanwhile
                pass
    out = [pid]
    for p in out:
        out += [c for c, pp in parent.items() if pp == p]
    return out


def kill_tree(proc: subprocess.Popen) -> None:
    """SIGKILL ``proc`` and every process under it: a torchrun agent, its ranks and their data
    workers (torchrun puts each rank in a session of its own, so killing the agent's group alone
    would leave the ranks training)."""
    for pid in reversed(_process_tree(proc.pid)):
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    proc.wait()


def kill_after_step(proc: subprocess.Popen, run_dir, step: int, log, timeout: float = 300) -> int:
    """SIGKILL ``proc`` and every process under it as soon as metrics.jsonl shows ``step``;
    the last step logged when it died."""
    metrics = run_dir / "metrics.jsonl"
    deadline = time.monotonic() + timeout
    try:
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                raise AssertionError(f"run ended before step {step}: {log.read_text()[-2000:]}")
            if metrics.is_file() and any(s >= step for s, _ in losses(run_dir)):
                break
            time.sleep(0.02)
        else:
            raise AssertionError(f"step {step} not reached in {timeout}s")
    finally:
        kill_tree(proc)
    return max(s for s, _ in losses(run_dir))


def end_spawned_rank() -> None:
    """The last call of a test rank started by torch.multiprocessing: a barrier, the process
    group destroyed, then an immediate exit. torch 2.13's gloo can abort in C++ destructors at
    interpreter exit ("terminate called without an active exception", no Python frame; about one
    run in twelve under load), which spawn reports as a failed rank after all its work and
    results are done; os._exit skips that teardown."""
    import torch.distributed as dist

    dist.barrier()
    dist.destroy_process_group()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


@pytest.fixture(scope="module")
def one_thread():
    """Tiny tensors: intra-op threads only contend for the few shared cores (8x slower); a
    module opts in with ``pytestmark = pytest.mark.usefixtures("one_thread")``."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def nan_poison(monkeypatch):
    """Fresh allocations (torch.empty / empty_like) come back filled with NaN, so code that
    reads memory it never wrote fails loudly instead of passing by luck."""
    import torch

    empty, empty_like = torch.empty, torch.empty_like

    def poisoned(fn):
        def wrapper(*args, **kwargs):
            out = fn(*args, **kwargs)
            if out.is_floating_point():
                out.fill_(float("nan"))
            return out

        return wrapper

    monkeypatch.setattr(torch, "empty", poisoned(empty))
    monkeypatch.setattr(torch, "empty_like", poisoned(empty_like))
