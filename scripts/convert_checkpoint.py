#!/usr/bin/env python
"""Convert a mace-torch model file for mace_accel: the same as ``mace-accel convert``.

    python scripts/convert_checkpoint.py IN.model OUT.model [--dtype float32|float64] [--to-e3nn]
                                         [--device cpu|cuda] [--no-check] [--force] [--non-strict]
"""
import sys
from pathlib import Path

try:
    from mace_accel.cli import main
except ImportError:  # run from a source checkout without installing
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from mace_accel.cli import main


if __name__ == "__main__":
    sys.exit(main(["convert", *sys.argv[1:]]))
