"""CUDA C++ templates rendered by mace_accel.backends.cuda.codegen (installed as mace_accel.kernels)."""
