"""Every model family's tiny config trains on the Triton kernels (``model.kernels = "triton"``,
under the interpreter on CPU) with the losses of the PyTorch path (``"torch"``): issue 9's
"every family's tiny config trains for a few steps" check, through the real trainer (data
loader, AdamW, gradient clipping), not a bare forward.

Each family runs once per backend: the config's own model (tiny.toml cut to one block pair
of half width, see SHRINK), fp32, on one sequence of 32 tokens of the shared test corpus
(tests/conftest.py) per step for 2 optimizer steps at the full learning rate, so the second
loss also compares the parameters after one AdamW update made from the kernels' gradients.
A spy on the ops' dispatch records which ops ran on Triton, so a model that silently fell back
to PyTorch fails too.

Families whose ops have no Triton kernel yet (``ssd``: Mamba-2; ``titans``) fail here with
``ValueError: ... has no Triton kernel yet`` until those kernels land; that is intended.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

import kernels.gla
import kernels.linear_cross_entropy
import kernels.moe
import kernels.rmsnorm
import kernels.selective_scan
import kernels.short_conv
import kernels.ssd
import kernels.swiglu
import kernels.titans
from kernels import dispatch

pytestmark = pytest.mark.usefixtures("one_thread")
ROOT = Path(__file__).resolve().parents[2]
STEPS = 2
# fp32 on CPU: the Triton kernels and the PyTorch path differ by summation order only; the
# losses measured 1.7e-7 relative apart at most (tiny, gla_tiny, sambay_tiny).
RTOL, ATOL = 1e-4, 1e-6

# config -> the ops its layers call (their dispatch names): every block's RMSNorm, the SwiGLU
# FFN's gating, Mamba-2's gated norm, the GMU's gating, the short convolutions, the MoE dispatch
# and expert GEMMs, and the recurrent cores; every family's loss also runs through the fused
# head's kernel (HEAD_OPS).
NORMS = {"rms_norm"}
CONV = {"causal_conv1d"}
FAMILIES = {
    "tiny.toml": {"selective_scan", "swiglu", *CONV, *NORMS},
    "llama_tiny.toml": {"swiglu", *NORMS},
    "gla_tiny.toml": {"gla", "swiglu", *NORMS},
    "mamba2_tiny.toml": {"ssd", "gated_rms_norm", *CONV, *NORMS},
    "sambay_tiny.toml": {"selective_scan", "gated_memory", "swiglu", *CONV, *NORMS},
    "titans_mac_tiny.toml": {"titans", "swiglu", *CONV, *NORMS},
    "rmoe_tiny.toml": {"moe", *NORMS},
}
HEAD_OPS = {"linear_cross_entropy"}
# The interpreter runs the selective scan as one program per (sequence, 32 channels), token by
# token: its time grows with d_inner x Mamba layers. tiny.toml (d_inner 512, 3 Mamba layers, the
# largest) keeps one 'mamba swa' pair at half width: 8 programs, as sambay_tiny's layers have.
# rmoe_tiny's grouped expert GEMMs are one interpreted program per (expert, weight tile) in the
# backward: its 4 layers of width 128 took 78 s; two layers of width 64 keep the GRU router
# carried from one MoE layer to the next in 13 s.
SHRINK = {
    "tiny.toml": ["model.n_layers=2", "model.d_model=128"],
    "rmoe_tiny.toml": ["model.n_layers=2", "model.d_model=64"],
}
OP_MODULES = (
    kernels.gla, kernels.linear_cross_entropy, kernels.moe, kernels.rmsnorm, kernels.selective_scan,
    kernels.short_conv, kernels.ssd, kernels.swiglu, kernels.titans,
)
SELECT = dispatch.select  # the real one, before any spy replaces it


def test_every_tiny_config_is_listed():
    """A new family's tiny config must join FAMILIES (and so this check)."""
    found = {p.name for p in (ROOT / "configs").glob("*tiny*.toml")}
    assert found == set(FAMILIES)


def _train(config: str, kernels_backend: str, corpus: Path, data_dir: Path, run_dir: Path, monkeypatch):
    """Losses of STEPS optimizer steps of ``config`` and the set of ops that ran on Triton."""
    from pretrain.config import load_config
    from pretrain.train.trainer import Trainer
    from parallel.dims import destroy_distributed
    from tests.conftest import data_overrides

    ran_triton: set[str] = set()
    select = SELECT

    def spy(op, backend, device, module):
        chosen = select(op, backend, device, module)
        if chosen == "triton":
            ran_triton.add(op)
        return chosen

    for mod in (dispatch, *OP_MODULES):  # the ops import it by name; a new one may not
        monkeypatch.setattr(mod, "select", spy)
    overrides = [
        *data_overrides(corpus, data_dir),
        f"run.dir='{run_dir}'",
        f"model.kernels='{kernels_backend}'",
        "train.device='cpu'",
        "train.dtype='fp32'",
        "train.peak_flops=1e12",  # skips the CPU GEMM measurement of the MFU peak (about 1 s a run)
        f"train.max_steps={STEPS}",
        "train.global_batch_size=1",
        "train.micro_batch_size=1",
        *SHRINK.get(config, []),
        "optim.warmup_steps=1",
        "checkpoint.interval=0",
        "logging.wandb='disabled'",
        "logging.progress='off'",
    ]
    torch.manual_seed(0)
    try:
        trainer = Trainer(load_config(ROOT / "configs" / config, overrides), resume="none", log=lambda *_: None)
        got = [trainer.train_step()["loss"].item() for _ in range(STEPS)]
    finally:
        destroy_distributed()
    return got, ran_triton


@pytest.mark.parametrize("config", list(FAMILIES))
def test_tiny_config_trains_on_triton_like_torch(config, small_corpus, prepared_dir, tmp_path, monkeypatch):
    monkeypatch.delenv(dispatch.ENV_VAR, raising=False)
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    ref, ran_ref = _train(config, "torch", small_corpus, prepared_dir, tmp_path / "torch", monkeypatch)
    got, ran = _train(config, "triton", small_corpus, prepared_dir, tmp_path / "triton", monkeypatch)
    assert ran_ref == set() and ran == FAMILIES[config] | HEAD_OPS
    assert all(torch.isfinite(torch.tensor(ref)))
    torch.testing.assert_close(torch.tensor(got), torch.tensor(ref), rtol=RTOL, atol=ATOL)
