"""ASE calculator for MACE models with an on-device (torch) neighbour list and input pipeline."""
from .calculator import MACEAccelCalculator, build_batch, load_model
from .neighbours import neighbour_list

__all__ = ["MACEAccelCalculator", "build_batch", "load_model", "neighbour_list"]
