"""Kernel tests run the Triton code under the interpreter on CPU tensors: tests/conftest.py sets
``TRITON_INTERPRET=1`` before anything can import triton (which reads it at import);
``TRITON_INTERPRET=0`` in the environment runs them compiled on CUDA."""
