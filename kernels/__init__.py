"""Triton kernels, their PyTorch references, and the dispatch between them (see kernels.ops)."""
