"""Datasets by format: a registry of builders that read a format's files into items and splits.

`load_dataset(path, format, kind, **options)` reads a dataset by format name, or detects the
format from the path among the formats of one kind; format modules in this package register
themselves (see `base`).
"""

from medai.io.datasets.base import (
    FORMATS,
    DatasetFormat,
    DatasetSplits,
    check_format,
    detect_format,
    file_named,
    folder_with,
    format_names,
    load_dataset,
    register_format,
    resolve_source,
)

__all__ = [
    "FORMATS", "DatasetFormat", "DatasetSplits", "check_format", "detect_format", "file_named", "folder_with",
    "format_names", "load_dataset", "register_format", "resolve_source",
]
