"""Stage 2 of the pipeline: the static schedule of a tensor-product problem.

:func:`build_plan` turns a :class:`~mace_accel.problem.TPProblem` into a :class:`TPPlan`: for every path,
the sparse Clebsch-Gordan nonzeros with the normalisation already folded in, plus every offset the
executors need. The CUDA code generator unrolls exactly these nonzeros into straight-line code and the
reference executor builds its dense blocks from the same list, so both backends share one source of truth.
"""
from .cg import wigner_3j
from .schedule import PathPlan, TPPlan, build_plan, get_plan, register_plan

__all__ = ["wigner_3j", "PathPlan", "TPPlan", "build_plan", "get_plan", "register_plan"]
