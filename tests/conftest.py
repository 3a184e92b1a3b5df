import os
import sys

os.environ.setdefault("TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

# The suite is many small ops: one thread avoids OpenMP hand-off costs on the 2-core CI machine.
torch.set_num_threads(1)


def _cuda_ok():
    try:
        import torch

        if not torch.cuda.is_available():
            return False
        import cupy  # noqa: F401

        return True
    except Exception:
        return False


def pytest_collection_modifyitems(config, items):
    if _cuda_ok():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU and CuPy")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(autouse=True)
def _fresh_native_plans():
    """Native conv plans hold the kernels chosen when they were made; tests monkeypatch the kernel-table
    switches, so each test makes its plans afresh (the compiled kernels stay cached)."""
    native = sys.modules.get("mace_accel.backends.cuda.native")
    if native is not None:
        native.forget_plans()
    yield
