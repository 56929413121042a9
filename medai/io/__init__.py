"""Readers: files and servers to arrays with metadata (no torch models here)."""
