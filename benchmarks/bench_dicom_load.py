"""`make bench` entry for benchmarks/dicom_load.py (the Makefile runs bench_*.py)."""

import runpy
from pathlib import Path

runpy.run_path(str(Path(__file__).with_name("dicom_load.py")), run_name="__main__")
