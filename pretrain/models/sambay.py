"""Layer patterns of SambaY (Ren et al. 2025) and its YOCO baseline.

With L layers: blocks 0..L/2-1 are the Samba self-decoder (the recurrent layer on even,
sliding-window attention on odd indices); block L/2 is a recurrent layer (for SambaY the one
that exports the GMU memory); block L/2+1 is the single full-attention layer whose keys/values
every later block shares; from L/2+2 on the cross-decoder alternates GMU and cross-attention
blocks (SambaY) or is cross-attention only (YOCO). The '_da' variants use differential
attention in every attention layer. ``rnn`` picks the recurrent layer: Mamba (SambaY), Mamba-2
(ArchScale's SambaY-2) or GLA. Configs may spell the pattern out instead; every block gets the
config's FFN.
"""

from __future__ import annotations

VARIANTS = ("sambay", "sambay_da", "yoco", "yoco_da")
RNNS = ("mamba", "mamba2", "gla")


def sambay_pattern(n_layers: int, variant: str = "sambay", rnn: str = "mamba") -> list[str]:
    """The mixer names of the ``n_layers`` blocks of ``variant`` (one of :data:`VARIANTS`) with
    the recurrent layer ``rnn`` (one of :data:`RNNS`)."""
    if variant not in VARIANTS:
        raise ValueError(f"sambay_pattern: unknown variant {variant!r}; known: {list(VARIANTS)}")
    if rnn not in RNNS:
        raise ValueError(f"sambay_pattern: unknown rnn {rnn!r}; known: {list(RNNS)}")
    if n_layers < 4 or n_layers % 2:
        raise ValueError(f"sambay_pattern: n_layers must be even and >= 4, got {n_layers}")
    da = variant.endswith("_da")
    swa, full, cross = ("diff_swa", "diff_attn_kv", "diff_xattn") if da else ("swa", "attn_kv", "xattn")
    gmu = variant.startswith("sambay")
    half = n_layers // 2
    self_decoder = [rnn if i % 2 == 0 else swa for i in range(half)]
    middle = [f"{rnn}_mem" if gmu else rnn, full]
    cross_decoder = ["gmu" if gmu and i % 2 == 0 else cross for i in range(n_layers - half - 2)]
    return self_decoder + middle + cross_decoder
