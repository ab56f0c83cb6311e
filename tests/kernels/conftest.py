"""Kernel tests run the Triton code under the interpreter on CPU tensors. ``triton.jit`` picks the
interpreter when a kernel is defined, so the variable is set here, before any test module of this
folder imports a kernel; ``TRITON_INTERPRET=0`` in the environment runs them compiled on CUDA."""

import os

os.environ.setdefault("TRITON_INTERPRET", "1")
