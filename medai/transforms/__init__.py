"""MONAI-style dictionary transforms between medai.io and the models."""
