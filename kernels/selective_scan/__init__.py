"""Mamba-1 selective scan kernels (Gu & Dao 2023); ``chunk.py`` holds the Triton scan."""
