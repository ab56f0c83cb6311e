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
from typing import Any, ClassVar

import tomli_w


class ConfigError(ValueError):
    """A bad configuration: the message is one line and names the field."""


# --------------------------------------------------------------------------- model


@dataclass
class AttentionConfig:
    n_heads: int = 4
    """Query heads of every attention mixer."""
    n_kv_heads: int = 0
    """Key/value heads (grouped-query attention); 0 means n_heads."""
    head_dim: int = 0
    """Width of one head; 0 means model.d_model // n_heads."""
    window: int = 128
    """Sliding-window size in tokens for 'swa' mixers (a token sees itself and window-1 before it)."""
    pos_encoding: str = "rope"
    """Positional encoding of attention: 'rope' or 'none' (NoPE)."""
    rope_theta: float = 10000.0
    """RoPE base frequency."""
    backend: str = "auto"
    """Attention kernel: 'auto' (flash-attn on CUDA when installed, else SDPA), 'sdpa' or 'flash'."""


@dataclass
class MambaConfig:
    d_state: int = 16
    """SSM state size N per channel."""
    d_conv: int = 4
    """Width of the short causal depthwise convolution."""
    expand: int = 2
    """Inner width = expand * d_model."""
    dt_rank: int = 0
    """Rank of the delta projection; 0 means ceil(d_model / 16)."""


@dataclass
class GLAConfig:
    used_by: ClassVar[tuple[str, ...]] = ("gla",)
    """Pattern names (mixer or FFN, or their prefix before '_') whose blocks read this section."""

    n_heads: int = 4
    """Heads of every 'gla' mixer."""
    expand_k: float = 0.5
    """Key/query width = expand_k * d_model."""
    expand_v: float = 1.0
    """Value width = expand_v * d_model."""
    gate_low_rank: int = 16
    """Rank of the low-rank projection that produces the forget gate alpha."""
    gate_normalizer: float = 16.0
    """alpha = exp(logsigmoid(.) / gate_normalizer)."""
    chunk_size: int = 64
    """Chunk length of the chunkwise-parallel form."""

    def check(self, name: str, cfg: "ModelConfig") -> None:
        _check(self.n_heads > 0, f"{name}.n_heads", "must be > 0")
        _check(self.expand_k > 0 and self.expand_v > 0, f"{name}.expand_k", "expand_k and expand_v must be > 0")
        for field_name, width in (("expand_k", self.expand_k), ("expand_v", self.expand_v)):
            dim = width * cfg.d_model
            _check(
                dim == int(dim) and int(dim) % self.n_heads == 0,
                f"{name}.{field_name}",
                f"{field_name} * model.d_model = {dim} is not divisible by {name}.n_heads={self.n_heads}",
            )
        _check(self.gate_low_rank > 0, f"{name}.gate_low_rank", "must be > 0")
        _check(self.gate_normalizer > 0, f"{name}.gate_normalizer", "must be > 0")
        _check(self.chunk_size > 0, f"{name}.chunk_size", "must be > 0")


@dataclass
class Mamba2Config:
    used_by: ClassVar[tuple[str, ...]] = ("mamba2",)
    """Pattern names (mixer or FFN, or their prefix before '_') whose blocks read this section."""

    d_state: int = 64
    """SSM state size N per head."""
    d_conv: int = 4
    """Width of the short causal depthwise convolution."""
    expand: int = 2
    """Inner width = expand * d_model."""
    head_dim: int = 64
    """Channels per SSM head (scalar A per head)."""
    n_groups: int = 1
    """Groups of heads sharing B and C."""
    chunk_size: int = 64
    """Chunk length of the SSD algorithm."""

    def check(self, name: str, cfg: "ModelConfig") -> None:
        for f in ("d_state", "d_conv", "expand", "head_dim", "n_groups", "chunk_size"):
            _check(getattr(self, f) > 0, f"{name}.{f}", "must be > 0")
        inner = self.expand * cfg.d_model
        _check(inner % self.head_dim == 0, f"{name}.head_dim", f"does not divide the inner width {inner}")
        _check((inner // self.head_dim) % self.n_groups == 0, f"{name}.n_groups", "does not divide the heads")


@dataclass
class TitansConfig:
    used_by: ClassVar[tuple[str, ...]] = ("mac", "mag", "mal")
    """Pattern names (mixer or FFN, or their prefix before '_') whose blocks read this section."""

    memory_depth: int = 2
    """Layers of the neural memory MLP (1: a linear memory)."""
    memory_expand: int = 2
    """Hidden width of a deep memory = memory_expand * key width."""
    n_heads: int = 4
    """Memory heads (each head has its own memory)."""
    chunk_size: int = 64
    """MAG/MAL: tokens per memory update (one mini-batch gradient descent step; queries read the
    weights of their chunk's start). Chunks are aligned to document positions."""
    segment_size: int = 128
    """MAC: tokens per segment attended together with the memory read; MAC's memory is read for
    that context and updated once per segment (its chunk is the segment)."""
    mac_output: str = "per_token"
    """MAC's output: 'per_token' is the paper's o_t = y_t (x) M*_t(y_t), a read of token t's own
    weights (after its write; causal) gating the attention output y, with the memory's write gates
    from y; 'none' returns y ungated and takes the write gates from the block input (the layer
    before this option, kept to compare with and to load its checkpoints)."""
    n_persistent: int = 16
    """Learned persistent memory tokens."""
    max_lr: float = 0.1
    """Largest inner learning rate theta (theta = max_lr * sigmoid(linear(x)))."""
    conv_size: int = 4
    """Taps of the short causal depthwise conv on the memory's q, k, v."""

    def check(self, name: str, cfg: "ModelConfig") -> None:
        _check(self.max_lr > 0, f"{name}.max_lr", "must be > 0")
        for f in ("memory_depth", "memory_expand", "n_heads", "chunk_size", "segment_size", "conv_size"):
            _check(getattr(self, f) > 0, f"{name}.{f}", "must be > 0")
        _check(self.n_persistent >= 0, f"{name}.n_persistent", "must be >= 0")
        _choice(self.mac_output, f"{name}.mac_output", ("per_token", "none"))
        _check(cfg.d_model % self.n_heads == 0, f"{name}.n_heads", f"does not divide model.d_model={cfg.d_model}")


@dataclass
class MoEConfig:
    used_by: ClassVar[tuple[str, ...]] = ("moe", "moe_gru")
    """Pattern names (mixer or FFN, or their prefix before '_') whose blocks read this section."""

    n_experts: int = 8
    """Routed experts per MoE layer."""
    top_k: int = 2
    """Experts each token is sent to."""
    expert_hidden: int = 0
    """SwiGLU hidden width of one expert; 0 means the dense MLP's width."""
    router_hidden: int = 256
    """Hidden size h of the layerwise GRU router ('moe_gru')."""
    renormalize: bool = True
    """top_k >= 2: scale the chosen experts by their router probabilities renormalised to sum
    to 1 (Mixtral, RMoE); false: by the raw probabilities. No effect at top_k = 1, which always
    uses the raw probability (Switch): renormalised, the weight would be the constant 1 and
    the router would get no gradient from the LM loss."""
    aux_loss_coef: float = 1e-3
    """Load-balancing loss coefficient, applied as model.moe.balance says."""
    balance: str = "per_layer"
    """How the MoE layers' load-balancing losses combine. 'per_layer' (Switch, Megatron): the
    sum over the L MoE layers of each one's E * sum_e f_e P_e, L * coef when balanced.
    'global' (RMoE's reference = Hugging Face Mixtral's load_balancing_loss_func): one loss
    over the router outputs of all layers concatenated, k * coef when balanced. The balanced
    values (and, while the layers' loads are alike, the gradients) match with
    coef_global = coef_per_layer * L / top_k; see pretrain/models/layers/moe.py."""
    z_loss_coef: float = 0.0
    """Router z-loss coefficient (0: off)."""
    shared_expert: bool = False
    """Add one always-on shared expert."""

    def check(self, name: str, cfg: "ModelConfig") -> None:
        _check(self.n_experts > 0, f"{name}.n_experts", "must be > 0")
        _check(0 < self.top_k <= self.n_experts, f"{name}.top_k", f"must be in [1, {name}.n_experts]")
        _check(self.expert_hidden >= 0, f"{name}.expert_hidden", "must be >= 0")
        _check(self.router_hidden > 0, f"{name}.router_hidden", "must be > 0")
        _check(self.aux_loss_coef >= 0, f"{name}.aux_loss_coef", "must be >= 0")
        _choice(self.balance, f"{name}.balance", ("per_layer", "global"))
        _check(self.z_loss_coef >= 0, f"{name}.z_loss_coef", "must be >= 0")


@dataclass
class ModelConfig:
    vocab_size: int = 0
    """Vocabulary size; 0 takes the tokenizer's size when the model is built for training."""
    d_model: int = 256
    """Residual stream width."""
    n_layers: int = 6
    """Number of blocks."""
    layer_pattern: Any = "mamba swa"
    """Blocks' mixers: a string of space-separated names or a list, repeated to fill n_layers.
    A name may carry its FFN after a colon ('swa:mlp', 'mamba:none'); otherwise model.ffn is used."""
    ffn: str = "mlp"
    """Default FFN of every block: 'mlp' (SwiGLU) or 'none'."""
    ffn_hidden: int = 0
    """SwiGLU hidden width; 0 means 8/3 * d_model rounded up to a multiple of 64."""
    tie_embeddings: bool = True
    """Share the input embedding with the output head."""
    norm_eps: float = 1e-5
    """RMSNorm epsilon."""
    init_std: float = 0.02
    """Standard deviation of the normal initialisation of linear and embedding weights."""
    doc_masking: bool = True
    """Reset every mixer at document starts inside packed sequences."""
    attention: AttentionConfig = field(default_factory=AttentionConfig)
    """Attention mixers ('attn' full causal, 'swa' sliding window)."""
    mamba: MambaConfig = field(default_factory=MambaConfig)
    """Mamba-1 mixers ('mamba')."""
    mamba2: Mamba2Config = field(default_factory=Mamba2Config)
    """Mamba-2 (SSD) mixers ('mamba2')."""
    gla: GLAConfig = field(default_factory=GLAConfig)
    """Gated Linear Attention mixers ('gla')."""
    titans: TitansConfig = field(default_factory=TitansConfig)
    """Titans neural long-term memory ('mac', 'mag', 'mal')."""
    moe: MoEConfig = field(default_factory=MoEConfig)
    """Mixture-of-Experts FFNs ('moe' softmax top-k router, 'moe_gru' layerwise GRU router)."""

    def pattern(self) -> list[tuple[str, str]]:
        """The (mixer, ffn) of each of the n_layers blocks."""
        raw = self.layer_pattern
        names = raw.split() if isinstance(raw, str) else list(raw)
        if not names or len(names) > self.n_layers or self.n_layers % len(names):
            raise ConfigError(
                f"model.layer_pattern: {len(names)} entries do not tile model.n_layers={self.n_layers}"
            )
        out = []
        for name in names * (self.n_layers // len(names)):
            mixer, _, ffn = str(name).partition(":")
            out.append((mixer, ffn or self.ffn))
        return out


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
    """Tokens per packed training sample."""
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
    """Sequences per optimizer step, summed over data-parallel ranks and accumulation."""
    micro_batch_size: int = 8
    """Sequences per forward/backward on one rank; accumulation = global / (micro * dp)."""
    grad_clip: float = 1.0
    """Clip the global gradient norm to this value; 0 disables clipping."""
    eval_interval: int = 100
    """Steps between validation passes; 0 disables them (a final one still runs)."""
    eval_samples: int = 64
    """Validation sequences per validation pass."""
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
class ParallelConfig:
    dp_replicate: int = 1
    """Data-parallel replicas (HSDP outer dimension)."""
    dp_shard: int = -1
    """FSDP2 sharding degree; -1 takes every rank not used by other dimensions."""


@dataclass
class CheckpointConfig:
    interval: int = 100
    """Steps between checkpoints; 0 saves only at the end."""
    keep_last: int = 2
    """Complete checkpoints kept; older ones are deleted."""
    dir: str = ""
    """Checkpoint folder; empty means <run.dir>/checkpoints."""


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


def _check(cond: bool, name: str, msg: str) -> None:
    if not cond:
        raise ConfigError(f"{name}: {msg}")


def _choice(value: str, name: str, choices: set | tuple) -> None:
    _check(value in choices, name, f"{value!r} is not one of {sorted(choices)}")


def validate(cfg: Config) -> None:
    """Range and consistency checks; raises ConfigError naming the field."""
    m, a = cfg.model, cfg.model.attention
    _check(m.vocab_size >= 0, "model.vocab_size", "must be >= 0")
    _check(m.d_model > 0, "model.d_model", "must be > 0")
    _check(m.n_layers > 0, "model.n_layers", "must be > 0")
    _check(isinstance(m.layer_pattern, (str, list)), "model.layer_pattern", "must be a string or a list")
    mixers, ffns = _known_blocks()
    for mixer, ffn in m.pattern():
        _choice(mixer, "model.layer_pattern", mixers)
        _choice(ffn, "model.layer_pattern" if ffn != m.ffn else "model.ffn", ffns)
    _check(m.ffn_hidden >= 0, "model.ffn_hidden", "must be >= 0")
    _check(m.norm_eps > 0, "model.norm_eps", "must be > 0")
    _check(m.init_std > 0, "model.init_std", "must be > 0")
    _check(a.n_heads > 0, "model.attention.n_heads", "must be > 0")
    _check(
        a.head_dim > 0 or m.d_model % a.n_heads == 0,
        "model.attention.n_heads",
        f"{a.n_heads} heads do not divide model.d_model={m.d_model}",
    )
    _check(a.n_kv_heads >= 0, "model.attention.n_kv_heads", "must be >= 0")
    _check(
        a.n_heads % (a.n_kv_heads or a.n_heads) == 0,
        "model.attention.n_kv_heads",
        f"{a.n_kv_heads} KV heads do not divide model.attention.n_heads={a.n_heads}",
    )
    hd = a.head_dim or m.d_model // a.n_heads
    _check(a.head_dim >= 0, "model.attention.head_dim", "must be >= 0")
    _check(a.pos_encoding != "rope" or hd % 2 == 0, "model.attention.head_dim", "must be even for RoPE")
    _check(a.window > 0, "model.attention.window", "must be > 0")
    _choice(a.pos_encoding, "model.attention.pos_encoding", ("rope", "none"))
    _check(a.rope_theta > 0, "model.attention.rope_theta", "must be > 0")
    _choice(a.backend, "model.attention.backend", ("auto", "sdpa", "flash"))
    mb = m.mamba
    _check(mb.d_state > 0, "model.mamba.d_state", "must be > 0")
    _check(mb.d_conv > 0, "model.mamba.d_conv", "must be > 0")
    _check(mb.expand > 0, "model.mamba.expand", "must be > 0")
    _check(mb.dt_rank >= 0, "model.mamba.dt_rank", "must be >= 0")
    used = {n for pair in m.pattern() for n in pair}
    used |= {n.split("_")[0] for n in used}
    for f in dataclasses.fields(m):
        section = getattr(m, f.name)
        if hasattr(section, "check") and used & set(section.used_by):
            section.check(f"model.{f.name}", m)

    d = cfg.data
    _check(all(isinstance(s, str) for s in d.sources), "data.sources", "must be a list of strings")
    _check(len(d.sources) > 0, "data.sources", "must name at least one source")
    _check(
        not d.weights or len(d.weights) == len(d.sources),
        "data.weights",
        f"{len(d.weights)} weights for {len(d.sources)} data.sources",
    )
    _check(
        all(isinstance(w, (int, float)) and w >= 0 for w in d.weights) and (not d.weights or sum(d.weights) > 0),
        "data.weights",
        "must be non-negative numbers with a positive sum",
    )
    _check(bool(d.dir), "data.dir", "must not be empty")
    _choice(d.tokenizer_type, "data.tokenizer_type", ("bpe", "unigram"))
    _check(d.vocab_size >= 16, "data.vocab_size", "must be >= 16")
    _check(d.seq_len > 0, "data.seq_len", "must be > 0")
    _check(0 < d.valid_fraction < 1, "data.valid_fraction", "must be in (0, 1)")
    _check(d.num_workers >= 1, "data.num_workers", "must be >= 1")

    t = cfg.train
    _check(t.max_steps > 0, "train.max_steps", "must be > 0")
    _check(t.global_batch_size > 0, "train.global_batch_size", "must be > 0")
    _check(t.micro_batch_size > 0, "train.micro_batch_size", "must be > 0")
    _check(
        t.global_batch_size % t.micro_batch_size == 0,
        "train.global_batch_size",
        f"{t.global_batch_size} is not a multiple of train.micro_batch_size={t.micro_batch_size}",
    )
    _check(t.grad_clip >= 0, "train.grad_clip", "must be >= 0")
    _check(t.eval_interval >= 0, "train.eval_interval", "must be >= 0")
    _check(t.eval_samples > 0, "train.eval_samples", "must be > 0")
    _check(t.log_interval > 0, "train.log_interval", "must be > 0")
    _choice(t.device, "train.device", ("auto", "cpu", "cuda"))
    _choice(t.dtype, "train.dtype", ("auto", "fp32", "bf16"))
    _check(t.peak_flops >= 0, "train.peak_flops", "must be >= 0")

    o = cfg.optim
    _check(o.lr > 0 and math.isfinite(o.lr), "optim.lr", "must be a positive number")
    _check(0 <= o.min_lr_ratio <= 1, "optim.min_lr_ratio", "must be in [0, 1]")
    _check(o.weight_decay >= 0, "optim.weight_decay", "must be >= 0")
    _check(0 <= o.beta1 < 1, "optim.beta1", "must be in [0, 1)")
    _check(0 <= o.beta2 < 1, "optim.beta2", "must be in [0, 1)")
    _check(o.eps > 0, "optim.eps", "must be > 0")
    _choice(o.schedule, "optim.schedule", ("cosine", "wsd", "linear"))
    _check(o.warmup_steps >= 0, "optim.warmup_steps", "must be >= 0")
    _check(
        o.warmup_steps < t.max_steps,
        "optim.warmup_steps",
        f"{o.warmup_steps} must be < train.max_steps={t.max_steps} (the schedule must end on its floor)",
    )
    _check(0 < o.decay_fraction <= 1, "optim.decay_fraction", "must be in (0, 1]")
    _choice(o.fused, "optim.fused", ("auto", "true", "false"))

    p = cfg.parallel
    _check(p.dp_replicate >= 1, "parallel.dp_replicate", "must be >= 1")
    _check(p.dp_shard == -1 or p.dp_shard >= 1, "parallel.dp_shard", "must be -1 or >= 1")

    c = cfg.checkpoint
    _check(c.interval >= 0, "checkpoint.interval", "must be >= 0")
    _check(c.keep_last >= 1, "checkpoint.keep_last", "must be >= 1")

    lg = cfg.logging
    _choice(lg.wandb, "logging.wandb", ("offline", "online", "disabled"))
    _choice(lg.progress, "logging.progress", ("auto", "on", "off"))
    _check(bool(cfg.run.dir), "run.dir", "must not be empty")


def _known_blocks() -> tuple[set, set]:
    """Mixer and FFN names of the model registry."""
    from pretrain.models.registry import FFNS, MIXERS

    return set(MIXERS), set(FFNS)
