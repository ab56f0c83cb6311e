"""The recurrent cores of the models, one folder per op: ``gla``, ``selective_scan`` (Mamba-1),
``ssd`` (Mamba-2), ``titans`` (the neural memory). Each holds

* ``naive.py``: the executable specification, token by token in fp32 (fp64 for fp64 inputs);
* ``chunk_torch.py``: the chunked PyTorch implementation (CPU, and CUDA without Triton);
* ``chunk.py`` / ``fused_recurrent.py``: Triton kernels, where written;
* ``__init__.py``: the public functions, the only entry points of the models, which check their
  inputs and pick an implementation (:mod:`kernels.dispatch`, ``model.kernels``).
"""
