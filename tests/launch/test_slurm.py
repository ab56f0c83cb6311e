"""`pretrain launch slurm` and launch/torchrun.sh without a cluster: the rendered script is valid
bash; run with stand-ins for srun, scontrol and torchrun on PATH (which record their arguments
and environment) it starts the torchrun command the dry run prints, which torch's own torchrun
parser and `pretrain`'s parser read as 2 nodes x 8 ranks, c10d rendezvous on the first node,
the config, its overrides and --resume auto; SIGUSR1 reaches the ranks and requeues the job;
bad input is one line and exit code 2."""

from __future__ import annotations

import os
import shlex
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from torch.distributed.run import get_args_parser

from pretrain.cli import _parser as pretrain_parser
from pretrain.cli import main
from tests.conftest import ROOT, losses, set_args, tiny_overrides

BATCH = "train.global_batch_size=128"  # 16 data-parallel ranks x 8 sequences per micro-batch

STUBS = {
    # srun's options are recorded and dropped; the task runs as node 0 of the job
    "srun": """while [ $# -gt 0 ] && [ "${1#-}" != "$1" ]; do printf '%s\\n' "$1" >> "$STUB/srun.args"; shift; done
export SLURM_NODEID=0
trap 'echo USR1 >> "$STUB/srun.signals"; exit 0' USR1
if [ -n "${STUB_WAIT:-}" ]; then touch "$STUB/srun.started"; while :; do sleep 0.05; done; fi
exec "$@"
""",
    "scontrol": """if [ "$1 $2" = "show hostnames" ]; then printf '%s\\n' ${STUB_HOSTS:-gpu-01 gpu-02}
else echo "$*" >> "$STUB/scontrol.log"; fi
""",
    "torchrun": """printf '%s\\0' "$@" > "$STUB/torchrun.argv"; env > "$STUB/torchrun.env"
""",
    "sbatch": """printf '%s\\n' "$@" > "$STUB/sbatch.argv"; echo "Submitted batch job 4242"
""",
}
SLURM_ENV = {"SLURM_JOB_ID": "4242", "SLURM_NNODES": "2", "SLURM_JOB_NODELIST": "gpu-[01-02]",
             "SLURM_GPUS_ON_NODE": "8", "SLURM_CPUS_PER_TASK": "32"}


@pytest.fixture
def stubs(tmp_path) -> Path:
    """A folder of stand-in slurm and torchrun commands, first on PATH; they write under it."""
    folder = tmp_path / "stubs"
    folder.mkdir()
    for name, body in STUBS.items():
        (folder / name).write_text("#!/usr/bin/env bash\n" + body)
        (folder / name).chmod(0o755)
    return folder


def _stub_env(stubs: Path, **extra) -> dict:
    return {**os.environ, "PATH": f"{stubs}:{os.environ['PATH']}", "STUB": str(stubs), **SLURM_ENV, **extra}


def _dry_run(capsys, *args: str) -> tuple[str, list[str]]:
    """The rendered script and the printed per-node torchrun command of a --dry-run."""
    assert main(["launch", "slurm", *args, "--dry-run"]) == 0
    out = capsys.readouterr().out
    script, _, commands = out.partition("\n# dry run, not submitted")
    torchrun_lines = [line for line in commands.splitlines() if line.startswith("torchrun ")]
    assert len(torchrun_lines) == 1, commands
    return script, shlex.split(torchrun_lines[0])


def _run_script(script: str, tmp_path: Path, env: dict, **kwargs) -> subprocess.Popen:
    path = tmp_path / "job.sbatch"
    path.write_text(script)
    return subprocess.Popen(["bash", str(path)], cwd=tmp_path, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, **kwargs)


def test_template_and_rendered_script_pass_bash_n(capsys, tmp_path):
    script, _ = _dry_run(capsys, "configs/tiny.toml", "--nodes", "2", "--gpus-per-node", "8", "--set", BATCH)
    (tmp_path / "job.sbatch").write_text(script)
    for path in (ROOT / "launch/slurm.sbatch", tmp_path / "job.sbatch", ROOT / "launch/torchrun.sh"):
        result = subprocess.run(["bash", "-n", str(path)], capture_output=True, text=True)
        assert result.returncode == 0, (path, result.stderr)


def test_dry_run_2x8_commands(capsys, stubs, tmp_path):
    overrides = [BATCH, "train.max_steps=1000", "run.dir='runs/a b'"]
    sets = [a for o in overrides for a in ("--set", o)]
    script, printed = _dry_run(capsys, "configs/tiny.toml", "--nodes", "2", "--gpus-per-node", "8",
                               "--partition", "gpu", "--time", "2-00:00:00", *sets)
    header = [line for line in script.splitlines() if line.startswith("#SBATCH")]
    for want in ("--nodes=2", "--gpus-per-node=8", "--ntasks-per-node=1", "--partition=gpu",
                 "--time=2-00:00:00", "--requeue", "--signal=B:USR1@300", "--job-name=tiny"):
        assert f"#SBATCH {want}" in header, (want, header)

    # the script, run as slurm would on node 0, starts exactly the printed command
    proc = _run_script(script, tmp_path, _stub_env(stubs))
    out, _ = proc.communicate(timeout=30)
    assert proc.returncode == 0, out
    ran = (stubs / "torchrun.argv").read_text().split("\0")[:-1]
    runtime = {"$head_node": "gpu-01", "$SLURM_JOB_ID": "4242", "$SLURM_NODEID": "0"}
    for name, value in runtime.items():
        printed = [a.replace(name, value) for a in printed]
    assert ["torchrun", *ran] == printed
    srun = (stubs / "srun.args").read_text().split()
    assert {"--kill-on-bad-exit=1", "--output=logs/slurm-4242/node-%n.out", "--open-mode=append"} <= set(srun)

    args = get_args_parser().parse_args(ran)
    assert (args.nnodes, args.nproc_per_node, args.rdzv_backend) == ("2", "8", "c10d")
    assert (args.rdzv_endpoint, args.rdzv_id, args.max_restarts) == ("gpu-01:29500", "4242", 3)
    assert "SIGUSR1" in args.signals_to_handle.split(",")
    assert args.log_dir == "logs/slurm-4242/node-0" and args.tee == "3"
    assert args.module and args.training_script == "pretrain"
    train = pretrain_parser().parse_args(args.training_script_args)
    assert (train.command, train.config, train.overrides, train.resume) == (
        "train", "configs/tiny.toml", overrides, "auto")

    env = dict(line.split("=", 1) for line in (stubs / "torchrun.env").read_text().splitlines() if "=" in line)
    assert env["OMP_NUM_THREADS"] == "4"  # 32 CPUs per node / 8 ranks
    assert env["NCCL_DEBUG"] == "WARN" and env["TORCH_NCCL_ASYNC_ERROR_HANDLING"] == "3"
    assert env["TORCHELASTIC_LOG_LINE_PREFIX_TEMPLATE"] == "[rank${rank}]: "
    assert (tmp_path / "logs/slurm-4242").is_dir()


def test_usr1_reaches_the_ranks_and_requeues(capsys, stubs, tmp_path):
    script, _ = _dry_run(capsys, "configs/tiny.toml", "--nodes", "2", "--gpus-per-node", "8", "--set", BATCH,
                         "--signal-seconds", "600")
    assert "#SBATCH --signal=B:USR1@600" in script
    assert ': "${SHUTDOWN_TIMEOUT:=540}"' in script  # the ranks' time to checkpoint after the signal
    proc = _run_script(script, tmp_path, _stub_env(stubs, STUB_WAIT="1"))
    deadline = time.monotonic() + 20
    while not (stubs / "srun.started").exists():
        assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()[0]
        time.sleep(0.05)
    proc.send_signal(signal.SIGUSR1)  # what slurm sends the batch shell 600 s before the limit
    out, _ = proc.communicate(timeout=20)
    assert proc.returncode == 0, out
    assert (stubs / "srun.signals").read_text().split() == ["USR1"]
    assert (stubs / "scontrol.log").read_text().split() == ["requeue", "4242"]


def test_submits_with_sbatch(capsys, stubs, tmp_path, monkeypatch):
    monkeypatch.setenv("PATH", f"{stubs}:{os.environ['PATH']}")
    monkeypatch.setenv("STUB", str(stubs))
    run_dir = tmp_path / "run"
    args = ["launch", "slurm", "configs/tiny.toml", "--nodes", "2", "--gpus-per-node", "8",
            "--set", BATCH, "--set", f"run.dir='{run_dir}'"]
    assert main(args) == 0
    script = (run_dir / "slurm.sbatch").read_text()
    assert (stubs / "sbatch.argv").read_text().split() == [str(run_dir / "slurm.sbatch")]
    assert script in capsys.readouterr().out
    assert main([*args, "--dry-run"]) == 0 and capsys.readouterr().out.startswith(script)


@pytest.mark.parametrize("args, message", [
    (["configs/missing.toml", "--nodes", "2", "--gpus-per-node", "8"], "does not exist"),
    (["configs/tiny.toml", "--nodes", "0", "--gpus-per-node", "8"], "--nodes: must be >= 1"),
    (["configs/tiny.toml", "--nodes", "1", "--gpus-per-node", "0"], "--gpus-per-node: must be >= 1"),
    (["configs/tiny.toml", "--nodes", "2", "--gpus-per-node", "8", "--set", "train.max_steps=-1"], "train.max_steps"),
    # 16 ranks, the tiny config's batch of 8 sequences cannot be split over them
    (["configs/tiny.toml", "--nodes", "2", "--gpus-per-node", "8"], "16 ranks"),
    # pp=3 does not divide 2 x 8 ranks
    (["configs/tiny.toml", "--nodes", "2", "--gpus-per-node", "8", "--set", BATCH, "--set", "parallel.pp=3"],
     "parallel.pp: 3 does not divide the world size 16"),
    (["configs/tiny.toml", "--nodes", "2", "--gpus-per-node", "8", "--set", BATCH, "--partition", "a b"],
     "--partition"),
])
def test_bad_input_is_one_line_and_exit_2(capsys, args, message):
    assert main(["launch", "slurm", *args, "--dry-run"]) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    lines = captured.err.splitlines()
    assert len(lines) == 1 and lines[0].startswith("pretrain launch: error:") and message in lines[0], lines


def test_missing_sbatch_is_one_line_and_exit_2(capsys, tmp_path, monkeypatch):
    monkeypatch.setenv("PATH", str(tmp_path))  # no sbatch anywhere
    assert main(["launch", "slurm", "configs/tiny.toml", "--nodes", "1", "--gpus-per-node", "8", "--set", BATCH]) == 2
    captured = capsys.readouterr()
    assert captured.out == "" and len(captured.err.splitlines()) == 1 and "sbatch" in captured.err


def test_tensor_parallel_across_nodes_is_noted(capsys):
    # tp=4 on 2 GPUs per node: runnable, but every layer's collectives cross the network
    assert main(["launch", "slurm", "configs/tiny.toml", "--nodes", "2", "--gpus-per-node", "2",
                 "--set", "parallel.tp=4", "--dry-run"]) == 0
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 1 and "parallel.tp=4 does not divide --gpus-per-node 2" in err[0]


def test_torchrun_sh_prints_and_runs_its_command(stubs, tmp_path):
    env = {**_stub_env(stubs), "NNODES": "2", "NODE_RANK": "1", "NPROC_PER_NODE": "4",
           "MASTER_ADDR": "node-a", "MASTER_PORT": "29600", "MAX_RESTARTS": "2"}
    result = subprocess.run(["bash", str(ROOT / "launch/torchrun.sh"), "configs/tiny.toml", "--set", "a.b='x y'"],
                            env=env, capture_output=True, text=True, timeout=30)
    assert result.returncode == 0, result.stderr
    ran = (stubs / "torchrun.argv").read_text().split("\0")[:-1]
    assert shlex.split(result.stdout.strip().removeprefix("+ ")) == ["torchrun", *ran]
    args = get_args_parser().parse_args(ran)
    assert (args.nnodes, args.nproc_per_node, args.rdzv_backend, args.rdzv_endpoint, args.max_restarts) == (
        "2", "4", "c10d", "node-a:29600", 2)
    assert args.training_script_args == ["train", "configs/tiny.toml", "--set", "a.b='x y'"]


def test_rendered_script_trains_on_cpu(small_corpus, prepared_dir, stubs, tmp_path, capsys):
    """The rendered script with the real torchrun (srun and scontrol still stand-ins): one node of
    two CPU ranks (gloo) trains, each rank's output is in its own file, and the node's console
    lines carry the global rank."""
    run = tmp_path / "run"
    overrides = tiny_overrides(small_corpus, prepared_dir, run, **{
        "train.max_steps": 2, "optim.warmup_steps": 1, "train.eval_interval": 2, "checkpoint.interval": 2})
    script, _ = _dry_run(capsys, str(ROOT / "configs/tiny.toml"), "--nodes", "1", "--gpus-per-node", "2",
                         *set_args(overrides))
    (stubs / "torchrun").write_text(f"#!/usr/bin/env bash\nexec {sys.executable} -m torch.distributed.run \"$@\"\n")
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    env = _stub_env(stubs, STUB_HOSTS="127.0.0.1", MASTER_PORT=str(port), SLURM_NNODES="1",
                    SLURM_GPUS_ON_NODE="2", SLURM_CPUS_PER_TASK="2", PYTHONPATH=str(ROOT), WANDB_MODE="disabled")
    proc = _run_script(script, tmp_path, env, start_new_session=True)
    try:
        out, _ = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert proc.returncode == 0, out[-3000:]
    assert [s for s, _ in losses(run)] == [1, 2]
    assert "[rank0]: batch: 4 sequences per step" in out  # rank 0 logs; every rank has its own files
    for rank in (0, 1):
        logs = list((tmp_path / "logs/slurm-4242/node-0").glob(f"*/attempt_0/{rank}/stdout.log"))
        assert len(logs) == 1, rank
    rank0 = logs[0].parent.parent / "0/stdout.log"
    assert "batch: 4 sequences per step = 2 data-parallel rank(s)" in rank0.read_text()
