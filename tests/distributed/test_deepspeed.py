"""DeepSpeed ZeRO data parallelism (parallel.dp_backend = 'deepspeed') on two gloo ranks against
one process at the same global batch: the losses, gradient norms, final weights and AdamW state
of ZeRO-2 and ZeRO-3 runs of the tiny Mamba/SWA hybrid and of RMoE (aux loss, GRU router);
their checkpoints resume under ZeRO itself, under FSDP2 and in one process (and ZeRO resumes a
one-process checkpoint) to the same step-3 state, and load for inference with the one-process
weights; ZeRO-1 and ZeRO-3 with optimizer offload equal one process too; `pretrain train` under torchrun; a
missing DeepSpeed is a one-line config error."""

from __future__ import annotations

import importlib.util
import json
import os
import socket
import subprocess
import sys

import pytest
import torch
import torch.multiprocessing as mp

from pretrain.config import ConfigError, load_config
from tests.conftest import ROOT, end_spawned_rank, set_args, tiny_overrides
from tests.distributed.test_pipeline_train import _records

HAVE_DEEPSPEED = importlib.util.find_spec("deepspeed") is not None
needs_deepspeed = pytest.mark.skipif(not HAVE_DEEPSPEED, reason="DeepSpeed is not installed (pip install '.[deepspeed]')")

REL = 1e-5
CASES = {"hybrid": None, "rmoe": "configs/rmoe_tiny.toml"}
STAGES = (2, 3)


def _overrides(case: str, corpus, prepared, run_dir, **extra) -> list[str]:
    # 3 steps of 4 sequences in micro-batches of 2 (one accumulation step per rank on two ranks,
    # two in one process), a checkpoint at step 2 to resume from and one at the end
    values = {"train.max_steps": 3, "train.eval_interval": 3, "checkpoint.interval": 2, **extra}
    out = tiny_overrides(corpus, prepared, run_dir, **values)
    if CASES[case] is not None:  # the family's own layer pattern
        out = [o for o in out if not o.startswith(("model.layer_pattern", "model.n_layers"))]
    return out


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rank_main(rank: int, world: int, port: int, jobs: list) -> None:
    """Run ``jobs`` (trainer kind, config path, overrides, resume) one after another as rank
    ``rank`` of one gloo group, as torchrun would start it."""
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    from pretrain.train.deepspeed_step import DeepSpeedTrainer
    from pretrain.train.trainer import Trainer

    for kind, config, overrides, resume in jobs:
        cls = DeepSpeedTrainer if kind == "deepspeed" else Trainer
        cls(load_config(config, overrides), resume=resume, log=lambda *_: None).fit()
    end_spawned_rank()


def _checkpoint(step_dir, tmp_path) -> dict:
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    out = tmp_path / f"{step_dir.parent.parent.name}-{step_dir.name}.pt"
    dcp_to_torch_save(str(step_dir), str(out))
    state = torch.load(out, weights_only=False)
    return {"model": state["model"], "optim": state["optim"],
            "train": json.loads((step_dir / "train_state.json").read_text())}


def _assert_close(got: torch.Tensor, want: torch.Tensor, what: str) -> None:
    """||got - want|| <= REL ||want|| for one tensor. Not element by element: ZeRO-3 reduces the
    gradients in another order, and AdamW's normalised update turns the last-bit difference of
    a near-zero gradient element into ~1e-4 of that element's step (measured: 1e-4 on one
    element, 5e-7 on the whole tensor), while any real error (a lost group, lr or moment) moves
    whole tensors by ~lr."""
    assert got.shape == want.shape, what
    err = (got.double() - want.double()).norm().item()
    assert err <= REL * want.double().norm().item() + 1e-12, (what, err, want.norm().item())


def _assert_same_checkpoint(got: dict, want: dict, what: str) -> None:
    """Every weight, AdamW moment, step count and group hyperparameter under the same name,
    equal to REL; the same data position."""
    assert got["train"]["data"] == want["train"]["data"], what
    assert sorted(got["model"]) == sorted(want["model"]), what
    for k, w in want["model"].items():
        _assert_close(got["model"][k], w, f"{what} {k}")
    g, w = got["optim"], want["optim"]
    assert sorted(g["state"]) == sorted(w["state"]), what
    for k, ws in w["state"].items():
        assert g["state"][k]["step"].item() == ws["step"].item(), (what, k)
        for m in ("exp_avg", "exp_avg_sq"):
            _assert_close(g["state"][k][m], ws[m], f"{what} {k} {m}")
    for gg, wg in zip(g["param_groups"], w["param_groups"], strict=True):
        assert sorted(gg["params"]) == sorted(wg["params"]), what
        for key in ("lr", "weight_decay", "betas", "eps"):
            assert gg[key] == pytest.approx(wg[key], rel=1e-12), (what, key)


@needs_deepspeed
def test_zero_runs_equal_one_process_and_checkpoints_round_trip(small_corpus, prepared_dir, tmp_path):
    from pretrain.train import checkpoint as ckpt
    from pretrain.train.trainer import Trainer

    def run(name):
        return tmp_path / name

    def step_dir(name, step):
        return run(name) / "checkpoints" / f"step-{step:08d}"

    references = {}
    for case, config in CASES.items():
        reference = Trainer(load_config(config, _overrides(case, small_corpus, prepared_dir, run(f"{case}-single"))),
                            resume="none", log=lambda *_: None)
        reference.fit()
        references[case] = reference

    jobs = []
    for case, config in CASES.items():
        # ZeRO-2 resumes the one-process step-2 checkpoint
        over = _overrides(case, small_corpus, prepared_dir, run(f"{case}-from-single"),
                          **{"parallel.dp_backend": "'deepspeed'", "parallel.zero_stage": 2})
        jobs.append(("deepspeed", config, over, str(step_dir(f"{case}-single", 2))))
        for stage in STAGES:
            name = f"{case}-z{stage}"
            over = _overrides(case, small_corpus, prepared_dir, run(name), **{"parallel.dp_backend": "'deepspeed'",
                              "parallel.zero_stage": stage})
            jobs.append(("deepspeed", config, over, "none"))
            # ZeRO resumes its own step-2 checkpoint (weights and AdamW state into the partitions)
            over = _overrides(case, small_corpus, prepared_dir, run(name + "-resumed"),
                              **{"parallel.dp_backend": "'deepspeed'", "parallel.zero_stage": stage})
            jobs.append(("deepspeed", config, over, str(step_dir(name, 2))))
        if case == "hybrid":  # ZeRO-1, and ZeRO-3 with the AdamW state and step on the CPU
            for name, extra in (("z1", {"parallel.zero_stage": 1}),
                                ("z3-offload", {"parallel.zero_stage": 3, "parallel.zero_offload": "true"})):
                over = _overrides(case, small_corpus, prepared_dir, run(f"{case}-{name}"),
                                  **{"parallel.dp_backend": "'deepspeed'", **extra})
                jobs.append(("deepspeed", config, over, "none"))
        # FSDP2 on two ranks resumes the ZeRO-3 checkpoint
        jobs.append(("fsdp", config, _overrides(case, small_corpus, prepared_dir, run(f"{case}-fsdp")),
                     str(step_dir(f"{case}-z3", 2))))
    mp.start_processes(_rank_main, args=(2, _free_port(), jobs), nprocs=2, start_method="spawn")

    for case, config in CASES.items():
        reference = references[case]
        want_log = _records(run(f"{case}-single"))
        want = _checkpoint(step_dir(f"{case}-single", 3), tmp_path)
        # one process resumes the ZeRO-2 checkpoint
        alone = _overrides(case, small_corpus, prepared_dir, run(f"{case}-alone"))
        Trainer(load_config(config, alone), resume=str(step_dir(f"{case}-z2", 2)), log=lambda *_: None).fit()

        for name in [f"{case}-z{stage}" for stage in STAGES] + (["hybrid-z1", "hybrid-z3-offload"] if case == "hybrid" else []):
            got_log = _records(run(name))
            assert sorted(got_log) == [1, 2, 3], name
            for s in (1, 2, 3):
                for key in ("loss", "grad_norm", "val_loss") + (("aux_loss",) if "aux_loss" in want_log[s] else ()):
                    if key in want_log[s]:
                        assert got_log[s][key] == pytest.approx(want_log[s][key], rel=REL), (name, s, key)
            resumed = [name + "-resumed"] if run(name + "-resumed").exists() else []
            for done in [name, *resumed]:
                assert _records(run(done))[3]["loss"] == pytest.approx(want_log[3]["loss"], rel=REL), done
                _assert_same_checkpoint(_checkpoint(step_dir(done, 3), tmp_path), want, done)
        assert _records(run(f"{case}-from-single"))[3]["loss"] == pytest.approx(want_log[3]["loss"], rel=REL)
        for other in (f"{case}-fsdp", f"{case}-alone", f"{case}-from-single"):
            _assert_same_checkpoint(_checkpoint(step_dir(other, 3), tmp_path), want, other)

        # `pretrain eval`/generate's loader: the ZeRO-3 checkpoint in one process, the reference weights
        _, model, _ = ckpt.load_for_inference(step_dir(f"{case}-z3", 3))
        for n, p in reference.model.named_parameters():
            _assert_close(model.get_parameter(n).detach(), p.detach(), f"{case}-z3 loaded {n}")


@needs_deepspeed
def test_torchrun_cli_trains_with_deepspeed(small_corpus, prepared_dir, tmp_path):
    run_dir = tmp_path / "cli"
    over = tiny_overrides(small_corpus, prepared_dir, run_dir, **{"train.max_steps": 3, "checkpoint.interval": 0})
    env = {**os.environ, "PYTHONPATH": str(ROOT), "WANDB_MODE": "disabled", "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "pretrain",
           "train", "configs/tiny.toml", "--set", "parallel.dp_backend=deepspeed", *set_args(over)]
    result = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "DeepSpeed ZeRO-2 over 2 rank(s)" in result.stdout
    assert sorted(_records(run_dir)) == [1, 2, 3]
    assert (run_dir / "checkpoints" / "step-00000003" / "manifest.json").is_file()


def test_missing_deepspeed_is_one_line_config_error(small_corpus, prepared_dir, tmp_path):
    blocker = tmp_path / "site" / "deepspeed"
    blocker.mkdir(parents=True)
    (blocker / "__init__.py").write_text("raise ImportError('No module named deepspeed')\n")
    over = tiny_overrides(small_corpus, prepared_dir, tmp_path / "run", **{"parallel.dp_backend": "'deepspeed'"})
    env = {**os.environ, "PYTHONPATH": f"{blocker.parent}{os.pathsep}{ROOT}", "WANDB_MODE": "disabled"}
    result = subprocess.run([sys.executable, "-m", "pretrain", "train", *set_args(over)], cwd=ROOT, env=env,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 2, result.stderr[-2000:]
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "parallel.dp_backend" in lines[0] and "pretrain[deepspeed]" in lines[0], lines
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("setting, field", [
    (["parallel.zero_stage=0"], "parallel.zero_stage"),
    (["parallel.dp_backend='zero'"], "parallel.dp_backend"),
    (["parallel.dp_backend='deepspeed'", "parallel.pp=2"], "parallel.dp_backend"),
    (["parallel.dp_backend='deepspeed'", "parallel.dp_replicate=2"], "parallel.dp_backend"),
])
def test_bad_deepspeed_settings_name_the_field(setting, field):
    with pytest.raises(ConfigError, match=field):
        load_config(None, setting)
