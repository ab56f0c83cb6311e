"""The ``[model]`` section: the decoder's width and depth, its layer pattern, and one
subsection per layer family (attention, Mamba, Mamba-2, GLA, Titans, MoE).

Like torchtitan's model args: plain dataclasses with a docstring per field; a family's
subsection validates itself (``check``) only when the layer pattern uses that family.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, ClassVar

from pretrain.config.errors import ConfigError, require, require_choice


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
        require(self.n_heads > 0, f"{name}.n_heads", "must be > 0")
        require(self.expand_k > 0 and self.expand_v > 0, f"{name}.expand_k", "expand_k and expand_v must be > 0")
        for field_name, width in (("expand_k", self.expand_k), ("expand_v", self.expand_v)):
            dim = width * cfg.d_model
            require(
                dim == int(dim) and int(dim) % self.n_heads == 0,
                f"{name}.{field_name}",
                f"{field_name} * model.d_model = {dim} is not divisible by {name}.n_heads={self.n_heads}",
            )
        require(self.gate_low_rank > 0, f"{name}.gate_low_rank", "must be > 0")
        require(self.gate_normalizer > 0, f"{name}.gate_normalizer", "must be > 0")
        require(self.chunk_size > 0, f"{name}.chunk_size", "must be > 0")


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
            require(getattr(self, f) > 0, f"{name}.{f}", "must be > 0")
        inner = self.expand * cfg.d_model
        require(inner % self.head_dim == 0, f"{name}.head_dim", f"does not divide the inner width {inner}")
        require((inner // self.head_dim) % self.n_groups == 0, f"{name}.n_groups", "does not divide the heads")


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
        require(self.max_lr > 0, f"{name}.max_lr", "must be > 0")
        for f in ("memory_depth", "memory_expand", "n_heads", "chunk_size", "segment_size", "conv_size"):
            require(getattr(self, f) > 0, f"{name}.{f}", "must be > 0")
        require(self.n_persistent >= 0, f"{name}.n_persistent", "must be >= 0")
        require_choice(self.mac_output, f"{name}.mac_output", ("per_token", "none"))
        require(cfg.d_model % self.n_heads == 0, f"{name}.n_heads", f"does not divide model.d_model={cfg.d_model}")


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
        require(self.n_experts > 0, f"{name}.n_experts", "must be > 0")
        require(0 < self.top_k <= self.n_experts, f"{name}.top_k", f"must be in [1, {name}.n_experts]")
        require(self.expert_hidden >= 0, f"{name}.expert_hidden", "must be >= 0")
        require(self.router_hidden > 0, f"{name}.router_hidden", "must be > 0")
        require(self.aux_loss_coef >= 0, f"{name}.aux_loss_coef", "must be >= 0")
        require_choice(self.balance, f"{name}.balance", ("per_layer", "global"))
        require(self.z_loss_coef >= 0, f"{name}.z_loss_coef", "must be >= 0")


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
    z_loss_coef: float = 0.0
    """Weight of the output z-loss, ``coef * mean(logsumexp(logits)^2)`` (PaLM; keeps the
    softmax normaliser near 1 for bf16 stability); added to the auxiliary loss and logged as
    'z_loss'. 0 disables it."""
    norm_eps: float = 1e-5
    """RMSNorm epsilon."""
    init_std: float = 0.02
    """Standard deviation of the normal initialisation of linear and embedding weights."""
    doc_masking: bool = True
    """Reset every mixer at document starts inside packed sequences."""
    kernels: str = "auto"
    """Implementation of the recurrent cores (GLA, selective scan, SSD, Titans memory; package
    ``kernels``): 'auto' (Triton on CUDA where an op has a Triton kernel, else PyTorch), 'triton'
    (an error where it cannot run) or 'torch'. The environment variable PRETRAIN_KERNELS overrides it."""
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


def validate_model(m: ModelConfig) -> None:
    """Range and consistency checks of the model section; raises ConfigError naming the field."""
    a = m.attention
    require(m.vocab_size >= 0, "model.vocab_size", "must be >= 0")
    require(m.d_model > 0, "model.d_model", "must be > 0")
    require(m.n_layers > 0, "model.n_layers", "must be > 0")
    require(isinstance(m.layer_pattern, (str, list)), "model.layer_pattern", "must be a string or a list")
    mixers, ffns = _known_blocks()
    for mixer, ffn in m.pattern():
        require_choice(mixer, "model.layer_pattern", mixers)
        require_choice(ffn, "model.layer_pattern" if ffn != m.ffn else "model.ffn", ffns)
    require(m.ffn_hidden >= 0, "model.ffn_hidden", "must be >= 0")
    require(m.norm_eps > 0, "model.norm_eps", "must be > 0")
    require(m.init_std > 0, "model.init_std", "must be > 0")
    require_choice(m.kernels, "model.kernels", ("auto", "triton", "torch"))
    require(m.z_loss_coef >= 0, "model.z_loss_coef", "must be >= 0")
    require(a.n_heads > 0, "model.attention.n_heads", "must be > 0")
    require(
        a.head_dim > 0 or m.d_model % a.n_heads == 0,
        "model.attention.n_heads",
        f"{a.n_heads} heads do not divide model.d_model={m.d_model}",
    )
    require(a.n_kv_heads >= 0, "model.attention.n_kv_heads", "must be >= 0")
    require(
        a.n_heads % (a.n_kv_heads or a.n_heads) == 0,
        "model.attention.n_kv_heads",
        f"{a.n_kv_heads} KV heads do not divide model.attention.n_heads={a.n_heads}",
    )
    hd = a.head_dim or m.d_model // a.n_heads
    require(a.head_dim >= 0, "model.attention.head_dim", "must be >= 0")
    require(a.pos_encoding != "rope" or hd % 2 == 0, "model.attention.head_dim", "must be even for RoPE")
    require(a.window > 0, "model.attention.window", "must be > 0")
    require_choice(a.pos_encoding, "model.attention.pos_encoding", ("rope", "none"))
    require(a.rope_theta > 0, "model.attention.rope_theta", "must be > 0")
    require_choice(a.backend, "model.attention.backend", ("auto", "sdpa", "flash"))
    mb = m.mamba
    require(mb.d_state > 0, "model.mamba.d_state", "must be > 0")
    require(mb.d_conv > 0, "model.mamba.d_conv", "must be > 0")
    require(mb.expand > 0, "model.mamba.expand", "must be > 0")
    require(mb.dt_rank >= 0, "model.mamba.dt_rank", "must be >= 0")
    used = {n for pair in m.pattern() for n in pair}
    used |= {n.split("_")[0] for n in used}
    for f in dataclasses.fields(m):
        section = getattr(m, f.name)
        if hasattr(section, "check") and used & set(section.used_by):
            section.check(f"model.{f.name}", m)


def _known_blocks() -> tuple[set, set]:
    """Mixer and FFN names of the model registry."""
    from pretrain.models.registry import FFNS, MIXERS

    return set(MIXERS), set(FFNS)
