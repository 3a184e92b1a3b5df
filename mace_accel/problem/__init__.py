"""Stage 1 of the pipeline: a torch-free description of a tensor-product problem.

A :class:`TPProblem` holds exactly what e3nn's ``o3.TensorProduct`` is built from (three irreps, the
instructions, the two normalisations, whether weights are shared) and nothing about how it runs. Every
backend and the planner read it; it checks up front that the problem lies inside what the kernels support
and raises ``NotImplementedError`` naming what does not.
"""
from .irreps import Irrep, Irreps, MulIrrep
from .tp import Instruction, TPProblem, e3nn_path_norms

__all__ = ["Irrep", "Irreps", "MulIrrep", "Instruction", "TPProblem", "e3nn_path_norms"]
