"""Layers that are no model family of their own: Mamba (U-Mamba and EHRMamba use it) and FasterKAN (MedViT-V2's)."""
