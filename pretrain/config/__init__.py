"""Typed run configuration: dataclasses loaded from TOML, overridden with ``--set``.

Every field has a docstring (the string literal right below it); ``pretrain plan``
and the README's config tour read them. Loading validates types, ranges and
cross-field consistency and raises :class:`ConfigError` with a one-line message
that names the offending field, so the CLI can exit with code 2 and no traceback.
"""

from __future__ import annotations

import dataclasses
import math
import tomllib
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import tomli_w

from pretrain.config.errors import ConfigError, require, require_choice
from pretrain.config.parallel import (  # noqa: F401  (re-exported)
    AC_MODES,
    PP_SCHEDULES,
    ParallelConfig,
    split_position,
    validate_parallel,
)
from pretrain.config.model import (
    AttentionConfig,
    GLAConfig,
    Mamba2Config,
    MambaConfig,
    ModelConfig,
    MoEConfig,
    TitansConfig,
    validate_model,
)

__all__ = [
    "AC_MODES", "AttentionConfig", "CheckpointConfig", "Config", "ConfigError", "DataConfig", "EvalConfig", "GLAConfig",
    "LoggingConfig", "Mamba2Config", "MambaConfig", "ModelConfig", "MoEConfig", "OptimConfig",
    "PP_SCHEDULES", "ParallelConfig", "RunConfig", "TitansConfig", "TrainConfig", "config_from_dict", "load_config",
    "split_position", "validate", "validate_parallel",
]


# ---------------------------------------------------------------------------- data


@dataclass
class DataConfig:
    sources: list = field(default_factory=lambda: ["builtin:kjv"])
    """Inputs of `pretrain prepare`, each prepared as one dataset and blended by data.weights:
    'builtin:kjv', 'builtin:shakespeare', a local .jsonl/.json/.parquet/.txt file or glob,
    'hf:NAME[:CONFIG]' (a hub dataset, online only), or 'prepared:DIR' (a dataset already prepared
    with the same tokenizer)."""
    weights: list = field(default_factory=list)
    """Blend weight of each source; empty means proportional to its number of tokens."""
    text_field: str = "text"
    """Field holding the document text in jsonl/parquet/hub records."""
    dir: str = "data/kjv"
    """Where `prepare` writes the tokenizer and the token shards, and where training reads them."""
    tokenizer: str = ""
    """Path of an existing sentencepiece .model; empty trains one on the sources."""
    tokenizer_type: str = "bpe"
    """Type of the sentencepiece model trained when data.tokenizer is empty: 'bpe' or 'unigram'."""
    vocab_size: int = 4096
    """Vocabulary size of the trained tokenizer."""
    seq_len: int = 256
    """Tokens per packed training sample. With data.sources, data.weights, the tokenizer settings
    and train.seed it fixes the sample order a checkpoint's position counts in: a resume that
    changes any of them is refused (`pretrain train --init-from` starts a new run from the weights)."""
    valid_fraction: float = 0.01
    """Fraction of documents held out for validation."""
    num_workers: int = 2
    """Tokenizer worker processes in `prepare`."""


# --------------------------------------------------------------------------- train


@dataclass
class TrainConfig:
    seed: int = 1234
    """Seed of the initialisation, the data order and sampling."""
    max_steps: int = 250
    """Optimizer steps to train for."""
    global_batch_size: int = 8
    """Sequences per optimizer step, summed over data-parallel ranks and accumulation:
    dp x micro_batch_size x parallel.pp_microbatches (1 without pipeline parallelism) x the
    gradient-accumulation steps, so it must be a multiple of the first three."""
    micro_batch_size: int = 8
    """Sequences per forward/backward on one rank (under pipeline parallelism: per pipeline
    micro-batch); accumulation = global / (micro x dp x parallel.pp_microbatches)."""
    grad_clip: float = 1.0
    """Clip the global gradient norm to this value; 0 disables clipping."""
    eval_interval: int = 100
    """Steps between validation passes; 0 disables them (a final one still runs)."""
    eval_samples: int = 64
    """Validation sequences per validation pass: the first ``min(eval_samples, the validation
    split's samples)`` of its fixed order, the same whatever dp and micro-batch size (see
    :func:`pretrain.data.loader.validation_batches`)."""
    log_interval: int = 10
    """Steps between metric records."""
    device: str = "auto"
    """'auto' (cuda when available), 'cpu' or 'cuda'."""
    dtype: str = "auto"
    """Compute precision: 'auto' (bf16 autocast on CUDA, fp32 on CPU), 'fp32' or 'bf16'."""
    compile: bool = False
    """torch.compile every block."""
    peak_flops: float = 0.0
    """Peak FLOP/s of one device for MFU; 0 looks up the GPU's dense bf16 datasheet peak, or on a
    CPU takes the best fp32 GEMM rate measured on this machine (see pretrain.train.mfu)."""
    max_skipped_steps: int = 5
    """Consecutive steps with a non-finite loss or gradient norm that stop the run. Such a step is
    skipped: its update is not applied and its gradients are dropped, but its data is consumed and
    the step counter (so the learning-rate schedule) moves on; skips are counted in the metrics
    ('skipped_steps'). 1 stops at the first one."""
    loss_spike_factor: float = 3.0
    """Log a step whose loss exceeds this many times the mean loss of the last 100 applied steps;
    0 disables the check."""
    collective_timeout_s: float = 600.0
    """Seconds a rank waits in one collective before failing (init_process_group's timeout), so
    the survivors of a dead rank exit instead of hanging."""
    slow_rank_factor: float = 1.5
    """Every log interval each rank's mean step time (excluding its wait for the others at the
    step boundary) is gathered; a rank slower than this many times the median is named. 0 disables
    the naming."""


@dataclass
class OptimConfig:
    lr: float = 3e-3
    """Peak learning rate."""
    min_lr_ratio: float = 0.1
    """Floor of cosine and wsd as a fraction of optim.lr: the last step (train.max_steps - 1)
    trains at exactly optim.lr * min_lr_ratio. 'linear' ends at 0."""
    weight_decay: float = 0.1
    """AdamW decoupled weight decay (not applied to norms, biases and embeddings)."""
    beta1: float = 0.9
    """AdamW beta1."""
    beta2: float = 0.95
    """AdamW beta2."""
    eps: float = 1e-8
    """AdamW epsilon."""
    schedule: str = "cosine"
    """Learning-rate schedule after warmup: 'cosine', 'wsd' (warmup-stable-decay) or 'linear' (to zero).
    Each starts at optim.lr on the first step after warmup and reaches its final value on the last
    step (see pretrain.train.optim.lr_at)."""
    warmup_steps: int = 30
    """Linear warmup steps: step 0 trains at optim.lr / warmup_steps, step warmup_steps - 1 at
    optim.lr. Must be < train.max_steps."""
    decay_fraction: float = 0.2
    """WSD: fraction of max_steps spent in the final decay."""
    fused: str = "auto"
    """Fused AdamW: 'auto' (on CUDA), 'true' or 'false'."""


@dataclass
class CheckpointConfig:
    interval: int = 100
    """Steps between checkpoints; 0 saves only at the end."""
    keep_last: int = 2
    """Complete checkpoints kept; older ones are deleted."""
    dir: str = ""
    """Checkpoint folder; empty means <run.dir>/checkpoints."""
    async_save: bool = False
    """Write checkpoints with DCP's async_save: training continues while a background thread
    writes; the step folder is completed (renamed, manifest written) only once the write finished,
    at the next checkpoint or at the end of the run. Only with several ranks (one process writes
    synchronously)."""


@dataclass
class LoggingConfig:
    wandb: str = "offline"
    """Weights & Biases mode: 'offline', 'online' or 'disabled'."""
    wandb_project: str = "pretrain"
    """Weights & Biases project."""
    plot: bool = True
    """Write a loss-curve PNG into the run directory."""
    progress: str = "auto"
    """Progress bar: 'auto' (on a terminal), 'on' or 'off'."""


@dataclass
class EvalConfig:
    at_end: bool = False
    """At the end of `pretrain train`, rank 0 scores the final checkpoint: perplexity and bits per
    byte on the validation split, and lm-evaluation-harness (eval.tasks) on its Hugging Face
    export; results in metrics.jsonl ('eval/...' keys) and <run.dir>/eval/. Needs the eval extra."""
    tasks: list = field(default_factory=lambda: ["kjv_chapter_ppl", "kjv_verse_choice"])
    """lm-eval tasks of eval.at_end: the offline ones shipped in pretrain/eval/tasks or any task
    lm-eval knows whose data is cached (there is no hub access); empty runs no lm-eval. Checked
    before training starts."""
    limit: int = 0
    """Documents per lm-eval task (0: all)."""


@dataclass
class RunConfig:
    name: str = "tiny"
    """Run name (wandb, logs)."""
    dir: str = "runs/tiny"
    """Run directory: resolved config, metrics.jsonl, loss curve, checkpoints."""


@dataclass
class Config:
    run: RunConfig = field(default_factory=RunConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def to_toml(self) -> str:
        return tomli_w.dumps(self.to_dict())

    def with_vocab(self, vocab_size: int | None = None) -> "Config":
        """This config with model.vocab_size filled in when it is 0: ``vocab_size`` (the
        tokenizer's), else data.vocab_size (the size the tokenizer will be trained to)."""
        if self.model.vocab_size:
            return self
        size = vocab_size or self.data.vocab_size
        return dataclasses.replace(self, model=dataclasses.replace(self.model, vocab_size=size))

    @property
    def checkpoint_dir(self) -> Path:
        return Path(self.checkpoint.dir or Path(self.run.dir) / "checkpoints")


# ------------------------------------------------------------------------ building


def _hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _coerce(value: Any, typ: Any, name: str) -> Any:
    """Check ``value`` against the annotation ``typ`` (ints widen to floats)."""
    if typ is Any:
        return value
    origin = typing.get_origin(typ) or typ
    if origin is bool:
        if isinstance(value, bool):
            return value
    elif origin is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif origin is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
    elif origin is str:
        if isinstance(value, str):
            return value
    elif origin is list:
        if isinstance(value, list):
            return value
    raise ConfigError(f"{name}: expected {getattr(origin, '__name__', origin)}, got {value!r}")


def _build(cls: type, data: dict, prefix: str) -> Any:
    hints = _hints(cls)
    kwargs = {}
    for key, value in data.items():
        name = f"{prefix}{key}"
        if key not in hints:
            raise ConfigError(f"{name}: unknown field")
        typ = hints[key]
        if dataclasses.is_dataclass(typ):
            if not isinstance(value, dict):
                raise ConfigError(f"{name}: expected a table, got {value!r}")
            kwargs[key] = _build(typ, value, name + ".")
        else:
            kwargs[key] = _coerce(value, typ, name)
    return cls(**kwargs)


def _parse_value(text: str) -> Any:
    """A --set value: TOML syntax where it parses (numbers, booleans, lists, quoted strings),
    otherwise the bare text as a string."""
    try:
        return tomllib.loads(f"v = {text}")["v"]
    except tomllib.TOMLDecodeError:
        return text


def _apply_override(data: dict, override: str) -> None:
    key, sep, text = override.partition("=")
    key = key.strip()
    if not sep or not key:
        raise ConfigError(f"--set {override!r}: expected section.field=value")
    parts = key.split(".")
    cls: Any = Config
    node = data
    for i, part in enumerate(parts):
        hints = _hints(cls)
        if part not in hints:
            raise ConfigError(f"{'.'.join(parts[: i + 1])}: unknown field")
        typ = hints[part]
        if i == len(parts) - 1:
            if dataclasses.is_dataclass(typ):
                raise ConfigError(f"{key}: is a section, set one of its fields")
            node[part] = _parse_value(text.strip())
        else:
            if not dataclasses.is_dataclass(typ):
                raise ConfigError(f"{'.'.join(parts[: i + 1])}: is not a section")
            node = node.setdefault(part, {})
            cls = typ


def config_from_dict(data: dict, overrides: list[str] | None = None) -> Config:
    """Build and validate a config from a nested dict plus ``section.field=value`` overrides."""
    data = _deepcopy(data)
    for override in overrides or []:
        _apply_override(data, override)
    cfg = _build(Config, data, "")
    validate(cfg)
    return cfg


def _deepcopy(data: dict) -> dict:
    return {k: _deepcopy(v) if isinstance(v, dict) else v for k, v in data.items()}


def load_config(path: str | Path | None, overrides: list[str] | None = None) -> Config:
    """Load a TOML config (``None``: the defaults), apply overrides, validate."""
    data: dict = {}
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"config file {str(p)!r} does not exist")
        try:
            data = tomllib.loads(p.read_text())
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(f"{p}: invalid TOML: {exc}") from None
    return config_from_dict(data, overrides)


# ---------------------------------------------------------------------- validation


def validate(cfg: Config) -> None:
    """Range and consistency checks; raises ConfigError naming the field."""
    validate_model(cfg.model)

    d = cfg.data
    require(all(isinstance(s, str) for s in d.sources), "data.sources", "must be a list of strings")
    require(len(d.sources) > 0, "data.sources", "must name at least one source")
    require(
        not d.weights or len(d.weights) == len(d.sources),
        "data.weights",
        f"{len(d.weights)} weights for {len(d.sources)} data.sources",
    )
    require(
        all(isinstance(w, (int, float)) and w >= 0 for w in d.weights) and (not d.weights or sum(d.weights) > 0),
        "data.weights",
        "must be non-negative numbers with a positive sum",
    )
    require(bool(d.dir), "data.dir", "must not be empty")
    require_choice(d.tokenizer_type, "data.tokenizer_type", ("bpe", "unigram"))
    require(d.vocab_size >= 16, "data.vocab_size", "must be >= 16")
    require(d.seq_len > 0, "data.seq_len", "must be > 0")
    require(0 < d.valid_fraction < 1, "data.valid_fraction", "must be in (0, 1)")
    require(d.num_workers >= 1, "data.num_workers", "must be >= 1")

    t = cfg.train
    require(t.max_steps > 0, "train.max_steps", "must be > 0")
    require(t.global_batch_size > 0, "train.global_batch_size", "must be > 0")
    require(t.micro_batch_size > 0, "train.micro_batch_size", "must be > 0")
    require(
        t.global_batch_size % t.micro_batch_size == 0,
        "train.global_batch_size",
        f"{t.global_batch_size} is not a multiple of train.micro_batch_size={t.micro_batch_size}",
    )
    require(t.grad_clip >= 0, "train.grad_clip", "must be >= 0")
    require(t.eval_interval >= 0, "train.eval_interval", "must be >= 0")
    require(t.eval_samples > 0, "train.eval_samples", "must be > 0")
    require(t.log_interval > 0, "train.log_interval", "must be > 0")
    require_choice(t.device, "train.device", ("auto", "cpu", "cuda"))
    require_choice(t.dtype, "train.dtype", ("auto", "fp32", "bf16"))
    require(t.peak_flops >= 0 and math.isfinite(t.peak_flops), "train.peak_flops", "must be a finite number >= 0")
    require(t.max_skipped_steps >= 1, "train.max_skipped_steps", "must be >= 1")
    require(
        t.loss_spike_factor == 0 or t.loss_spike_factor > 1, "train.loss_spike_factor", "must be 0 (off) or > 1"
    )
    require(
        t.collective_timeout_s > 0 and math.isfinite(t.collective_timeout_s),
        "train.collective_timeout_s", "must be a finite number > 0",
    )
    require(t.slow_rank_factor == 0 or t.slow_rank_factor > 1, "train.slow_rank_factor", "must be 0 (off) or > 1")

    o = cfg.optim
    require(o.lr > 0 and math.isfinite(o.lr), "optim.lr", "must be a positive number")
    require(0 <= o.min_lr_ratio <= 1, "optim.min_lr_ratio", "must be in [0, 1]")
    require(o.weight_decay >= 0, "optim.weight_decay", "must be >= 0")
    require(0 <= o.beta1 < 1, "optim.beta1", "must be in [0, 1)")
    require(0 <= o.beta2 < 1, "optim.beta2", "must be in [0, 1)")
    require(o.eps > 0, "optim.eps", "must be > 0")
    require_choice(o.schedule, "optim.schedule", ("cosine", "wsd", "linear"))
    require(o.warmup_steps >= 0, "optim.warmup_steps", "must be >= 0")
    require(
        o.warmup_steps < t.max_steps,
        "optim.warmup_steps",
        f"{o.warmup_steps} must be < train.max_steps={t.max_steps} (the schedule must end on its floor)",
    )
    require(0 < o.decay_fraction <= 1, "optim.decay_fraction", "must be in (0, 1]")
    require_choice(o.fused, "optim.fused", ("auto", "true", "false"))

    validate_parallel(cfg.parallel, cfg.model.n_layers, cfg.model.pattern(), cfg.model.moe.n_experts)
    if cfg.parallel.cp > 1:
        _validate_cp(cfg)
    if cfg.parallel.tp > 1:
        if cfg.parallel.sp:
            require(
                cfg.data.seq_len % cfg.parallel.tp == 0,
                "data.seq_len",
                f"{cfg.data.seq_len} does not divide over parallel.tp={cfg.parallel.tp} sequence-parallel ranks",
            )
        from parallel.tensor.region import tp_plans  # every layer has a plan that splits over tp

        tp_plans(cfg.model, cfg.parallel.tp, cfg.parallel.ep)

    c = cfg.checkpoint
    require(c.interval >= 0, "checkpoint.interval", "must be >= 0")
    require(c.keep_last >= 1, "checkpoint.keep_last", "must be >= 1")

    lg = cfg.logging
    require_choice(lg.wandb, "logging.wandb", ("offline", "online", "disabled"))
    require_choice(lg.progress, "logging.progress", ("auto", "on", "off"))
    require(bool(cfg.run.dir), "run.dir", "must not be empty")

    e = cfg.eval
    require(
        all(isinstance(t, str) and t.strip() and "," not in t for t in e.tasks),
        "eval.tasks", "must be a list of lm-eval task names",
    )
    require(e.limit >= 0, "eval.limit", "must be >= 0 (0: every document)")


def _validate_cp(cfg: Config) -> None:
    """Context parallelism's checks across sections: the sequence divides into its segments
    (and each segment over the sequence-parallel ranks), and SDPA attention (flash-attn's
    varlen path is not split)."""
    p, seq = cfg.parallel, cfg.data.seq_len
    n = p.cp_segments(cfg.model.pattern())
    lb = " (2 x parallel.cp: cp_load_balance is on)" if n == 2 * p.cp else ""
    require(seq % n == 0, "data.seq_len", f"{seq} does not divide into {n} context-parallel segments{lb}")
    if p.sp:
        require((seq // n) % p.tp == 0, "data.seq_len",
                f"its {n} context-parallel segments of {seq // n} tokens do not divide over parallel.tp={p.tp}")
    require(cfg.model.attention.backend != "flash", "model.attention.backend",
            "'flash' is not split by context parallelism (parallel.cp > 1); use 'auto' or 'sdpa'")
