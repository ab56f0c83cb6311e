"""Gated Linear Attention kernels (Yang et al. 2023); ``chunk.py`` holds the Triton chunked form."""
