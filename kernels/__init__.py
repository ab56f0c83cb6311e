"""Our kernels, one folder per op:

* recurrent cores: ``gla``, ``selective_scan`` (Mamba-1), ``ssd`` (Mamba-2), ``titans`` (the
  neural memory);
* fused element-wise and normalisation ops: ``rmsnorm`` (with the residual add, and gated),
  ``swiglu``, ``gmu`` (the Gated Memory Unit's gate), ``short_conv`` (the short causal conv of
  Mamba, Mamba-2 and Titans);
* ``moe``: token permutation by expert, grouped expert GEMMs, the GRU router cell;
* ``linear_cross_entropy``: the head and the loss without the ``[tokens, vocab]`` logits.

Each holds ``naive.py`` (the executable specification, in fp32, fp64 for fp64 inputs), the
PyTorch path (the CPU path, and CUDA without Triton), Triton kernels with their autograd
Functions, and ``__init__.py`` with the public functions: the only entry points of the models,
which check their inputs and pick an implementation (:mod:`kernels.dispatch`, ``model.kernels``).
"""
