"""Triton kernels, one folder per op (``naive.py`` spec, Triton ``chunk.py``/``recurrent.py``,
``__init__.py`` exporting the public functions). Models reach them through the one function
per mixer that each kernel replaces."""
