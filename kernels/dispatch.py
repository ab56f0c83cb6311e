"""Which implementation of an op runs: ``model.kernels`` ('auto' | 'triton' | 'torch'), overridden
by the environment variable ``PRETRAIN_KERNELS`` (tests, debugging).

'auto' takes the Triton kernel of an op when its module exists, triton is installed and the
tensors are on CUDA, else the PyTorch implementation; 'triton' insists and raises where it cannot
(on CPU tensors it runs under Triton's interpreter when ``TRITON_INTERPRET=1``: the tests).
"""

from __future__ import annotations

import functools
import importlib.util
import os

import torch

BACKENDS = ("auto", "triton", "torch")
ENV_VAR = "PRETRAIN_KERNELS"


@functools.cache
def _has_module(name: str) -> bool:
    try:
        return importlib.util.find_spec(name) is not None
    except ModuleNotFoundError:  # a parent package is missing
        return False


def triton_available(module: str) -> bool:
    """Whether the Triton implementation ``module`` (e.g. 'kernels.gla.chunk') and triton exist."""
    return _has_module("triton") and _has_module(module)


def select(op: str, backend: str, device: torch.device, module: str | None) -> str:
    """'triton' or 'torch' for ``op`` on ``device``.

    Args:
        op: the op's name, for messages.
        backend: ``model.kernels``; ``PRETRAIN_KERNELS``, when set and non-empty, replaces it.
        device: where the inputs live.
        module: the Triton implementation's module, or None where the op has none yet.

    Raises:
        ValueError: an unknown backend, or 'triton' where the op has no Triton kernel, triton is
            not installed or the inputs are not on CUDA.
    """
    if torch.compiler.is_compiling():
        return _select_eager(op, backend, device, module)
    return _select(op, backend, device, module)


@torch.compiler.disable  # reads the environment and the installed modules; a graph break is cheap
def _select_eager(op: str, backend: str, device: torch.device, module: str | None) -> str:
    return _select(op, backend, device, module)


def _select(op: str, backend: str, device: torch.device, module: str | None) -> str:
    # (eager callers skip torch.compiler.disable's wrapper: a decoding step calls select ~60 times)
    env = os.environ.get(ENV_VAR, "")
    source = f"{ENV_VAR}={env!r}" if env else f"model.kernels={backend!r}"
    backend = env or backend
    if backend not in BACKENDS:
        raise ValueError(f"{source}: must be one of {', '.join(BACKENDS)}")
    if backend == "torch":
        return "torch"
    available = module is not None and triton_available(module)
    if backend == "auto":
        return "triton" if available and device.type == "cuda" else "torch"
    # asked for explicitly, Triton also runs on CPU tensors under its interpreter (tests)
    runs = device.type == "cuda" or os.environ.get("TRITON_INTERPRET") == "1"
    if not (available and runs):
        if module is None:
            why = f"{op} has no Triton kernel yet"
        elif not available:
            why = f"{op}'s Triton kernel needs triton and {module}, which are not installed"
        else:
            why = f"{op}'s Triton kernel needs CUDA tensors (or TRITON_INTERPRET=1), got {device.type}"
        raise ValueError(f"{source}: {why}; use model.kernels='auto' or 'torch'")
    return "triton"


def cpu_torch_path(backend: str, x: torch.Tensor) -> bool:
    """Whether an op on ``x`` certainly takes the PyTorch path: a CPU tensor and neither
    ``backend`` (``model.kernels``) nor ``PRETRAIN_KERNELS`` asking for Triton (which runs CPU
    tensors under its interpreter). A decoding step then calls the PyTorch arithmetic directly:
    on one token the dispatch's checks cost more than the op (about 3 us against 2)."""
    return x.device.type == "cpu" and (os.environ.get(ENV_VAR, "") or backend) != "triton"


def at_least_fp32(x: torch.Tensor) -> torch.Tensor:
    """``x`` in fp32, or as it is when already wider (fp64): a float64 check is never rounded."""
    return x.to(torch.promote_types(x.dtype, torch.float32))


def check_inputs(op: str, tensors: dict[str, torch.Tensor | None]) -> None:
    """ValueError unless every given tensor is floating point and all share one device."""
    devices = {z.device for z in tensors.values() if z is not None}
    if len(devices) > 1:
        raise ValueError(f"{op}: inputs on several devices: {sorted(map(str, devices))}")
    for name, z in tensors.items():
        if z is not None and not z.is_floating_point():
            raise ValueError(f"{op}: {name} must be floating point, got {z.dtype}")
