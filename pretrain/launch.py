"""`pretrain launch slurm`: the sbatch script of a multi-node run, checked before it is queued.

The script is launch/slurm.sbatch with its #SBATCH header (nodes, GPUs per node, partition,
time limit, account, the preemption signal's lead) and the training arguments filled in; the
rest (one torchrun agent per node through srun, c10d rendezvous on the first node, per-rank
logs, the NCCL knobs, the SIGUSR1 trap that requeues the job) stays as written there, so a
rendered script and `sbatch launch/slurm.sbatch CONFIG` run the same commands.

The config is loaded and validated first, and its parallel layout checked against the world
size nodes x GPUs per node (parallel.dims.ParallelDims), so a run that cannot start is refused
before it waits in the queue.
"""

from __future__ import annotations

import re
import shlex
from dataclasses import dataclass, field
from pathlib import Path

from pretrain.config import Config, ConfigError, load_config

TEMPLATE = Path(__file__).resolve().parents[1] / "launch" / "slurm.sbatch"

TORCHRUN_SIGNALS = "SIGTERM,SIGINT,SIGHUP,SIGQUIT,SIGUSR1"
"""Signals each torchrun agent passes on to its ranks: slurm's SIGTERM (preemption, scancel) and
the SIGUSR1 that --signal sends ahead of the time limit."""


@dataclass
class SlurmJob:
    """What `pretrain launch slurm` was asked for; every field is checked by :func:`check`."""

    config: str
    nodes: int
    gpus_per_node: int
    overrides: list[str] = field(default_factory=list)
    partition: str = ""
    time: str = ""
    """slurm time limit, e.g. '2-00:00:00' (days-hours:minutes:seconds); empty: the partition's."""
    account: str = ""
    signal_seconds: int = 300
    """Seconds before the time limit at which slurm sends SIGUSR1 (checkpoint, exit, requeue)."""
    max_restarts: int = 3
    """torchrun restarts of all ranks after one fails, each resuming from the newest checkpoint."""
    port: int = 29500
    """Rendezvous port on the first node."""

    @property
    def world_size(self) -> int:
        return self.nodes * self.gpus_per_node

    @property
    def shutdown_timeout(self) -> int:
        """Seconds torchrun gives the ranks to checkpoint and exit after a signal before it kills
        them: the signal's lead less a minute for the requeue, at least 30 (torchrun's default)."""
        return max(self.signal_seconds - 60, 30)


def check(job: SlurmJob) -> Config:
    """Validate ``job`` and its config; return the loaded config.

    Raises ConfigError (one line naming the option or config field) for: a count < 1, a missing
    or invalid config or ``--set``, or a parallel layout (pp x dp_replicate x dp_shard x tp,
    ep, the batch) that does not fit nodes x gpus_per_node ranks."""
    from parallel.dims import ParallelDims

    if job.nodes < 1:
        raise ConfigError(f"--nodes: must be >= 1, got {job.nodes}")
    if job.gpus_per_node < 1:
        raise ConfigError(f"--gpus-per-node: must be >= 1, got {job.gpus_per_node}")
    if job.signal_seconds < 0:
        raise ConfigError(f"--signal-seconds: must be >= 0, got {job.signal_seconds}")
    if job.max_restarts < 0:
        raise ConfigError(f"--max-restarts: must be >= 0, got {job.max_restarts}")
    if not 0 < job.port < 65536:
        raise ConfigError(f"--port: must be in [1, 65535], got {job.port}")
    for name in ("partition", "time", "account"):
        value = getattr(job, name)
        if value and not re.fullmatch(r"[\w.,:@+-]+", value):
            raise ConfigError(f"--{name}: {value!r} is not a slurm {name} name")
    if not job.config:
        raise ConfigError("CONFIG: a TOML config is required (e.g. configs/tiny.toml)")
    cfg = load_config(job.config, job.overrides)
    try:
        ParallelDims.from_config(cfg.parallel, job.world_size, cfg.train)
    except ConfigError as exc:
        raise ConfigError(
            f"{exc} (--nodes {job.nodes} x --gpus-per-node {job.gpus_per_node} = {job.world_size} ranks)"
        ) from None
    return cfg


def layout_notes(cfg: Config, job: SlurmJob) -> list[str]:
    """Advice on a layout that runs but is likely slow: tensor-parallel groups that cross nodes
    (per-layer collectives over the network instead of NVLink)."""
    tp = cfg.parallel.tp
    if tp > 1 and job.gpus_per_node % tp:
        return [f"note: parallel.tp={tp} does not divide --gpus-per-node {job.gpus_per_node}: tensor-parallel "
                "groups cross nodes; keep tp within a node (usually tp <= 8)"]
    return []


def train_args(job: SlurmJob) -> list[str]:
    """`pretrain train`'s arguments on every rank (before the script's own --resume auto)."""
    out = [job.config]
    for o in job.overrides:
        out += ["--set", o]
    return out


def render(job: SlurmJob, cfg: Config) -> str:
    """The sbatch script: launch/slurm.sbatch with its header and knobs set. Raises ValueError
    when the template lacks a line this fills in."""
    text = TEMPLATE.read_text()
    header = [f"#SBATCH --job-name={_slug(cfg.run.name)}"]
    header += [f"#SBATCH --{name}={value}" for name in ("partition", "time", "account")
               if (value := getattr(job, name))]
    text = _sub(text, r"#SBATCH --job-name=.*", "\n".join(header))
    text = _sub(text, r"#SBATCH --nodes=.*", f"#SBATCH --nodes={job.nodes}")
    text = _sub(text, r"#SBATCH --gpus-per-node=.*", f"#SBATCH --gpus-per-node={job.gpus_per_node}")
    text = _sub(text, r"#SBATCH --signal=.*", f"#SBATCH --signal=B:USR1@{job.signal_seconds}")
    text = _sub(text, r"gpus=\$\{SLURM_GPUS_ON_NODE:-\d+\}", f"gpus=${{SLURM_GPUS_ON_NODE:-{job.gpus_per_node}}}")
    text = _sub(text, r'train_args=\("\$@"\)', f"train_args=({shlex.join(train_args(job))})")
    text = _sub(text, r': "\$\{MASTER_PORT:=\d+\}"', f': "${{MASTER_PORT:={job.port}}}"')
    text = _sub(text, r': "\$\{SHUTDOWN_TIMEOUT:=\d+\}"', f': "${{SHUTDOWN_TIMEOUT:={job.shutdown_timeout}}}"')
    return _sub(text, r': "\$\{MAX_RESTARTS:=\d+\}"', f': "${{MAX_RESTARTS:={job.max_restarts}}}"')


def node_command(job: SlurmJob) -> list[str]:
    """The torchrun command each node's srun task runs, as the rendered script builds it, with
    the values known only inside the job as shell variables: $head_node (the job's first node),
    $SLURM_JOB_ID, $SLURM_NODEID (this node's index in the job)."""
    return [
        "torchrun", "--log-dir=logs/slurm-$SLURM_JOB_ID/node-$SLURM_NODEID",
        f"--nnodes={job.nodes}", f"--nproc-per-node={job.gpus_per_node}", "--rdzv-backend=c10d",
        f"--rdzv-endpoint=$head_node:{job.port}", "--rdzv-id=$SLURM_JOB_ID", f"--max-restarts={job.max_restarts}",
        f"--signals-to-handle={TORCHRUN_SIGNALS}", f"--shutdown-timeout={job.shutdown_timeout}", "--tee=3",
        "-m", "pretrain", "train", *train_args(job), "--resume", "auto",
    ]


def script_path(cfg: Config) -> Path:
    """Where a submitted script is kept: beside the run's checkpoints."""
    return Path(cfg.run.dir) / "slurm.sbatch"


def describe(job: SlurmJob, script: Path, submit: bool) -> str:
    """The commands, for the terminal: the sbatch call and what every node runs."""
    lead = "submitting:" if submit else "dry run, not submitted; without --dry-run this runs:"
    return "\n".join([
        f"# {lead}",
        f"sbatch {shlex.quote(str(script))}",
        f"# then, on each of the {job.nodes} node(s) ($head_node: the job's first node; each node's",
        "# and each rank's output under logs/slurm-$SLURM_JOB_ID/):",
        _shell_join(node_command(job)),
    ])


def _shell_join(args: list[str]) -> str:
    """shlex.join, but arguments holding a shell variable ($head_node) in double quotes, so that
    the line reads (and pastes) as the script runs it."""
    return " ".join(f'"{a}"' if "$" in a and re.fullmatch(r"[\w$@%+=:,./-]+", a) else shlex.quote(a) for a in args)


def _slug(name: str) -> str:
    return re.sub(r"[^\w.-]", "_", name) or "pretrain"


def _sub(text: str, pattern: str, replacement: str) -> str:
    new, n = re.subn(rf"^{pattern}$", lambda _: replacement, text, count=1, flags=re.M)
    if n != 1:
        raise ValueError(f"launch template: no line matching {pattern!r}")
    return new
