"""CPU: the on-disk kernel cache detects corrupt and truncated entries and writes atomically; the compile
target follows the GPU, NVRTC's architectures and the override."""
import multiprocessing as mp
import os
import subprocess
import sys

import pytest

from mace_accel.backends.cuda import compiler


def test_roundtrip_and_corruption_detection(tmp_path, caplog):
    path = tmp_path / "k.cubin"
    payload = os.urandom(5000)
    compiler.write_entry(path, payload)
    assert compiler.read_entry(path) == payload
    blob = path.read_bytes()
    path.write_bytes(blob[:-10])  # truncated
    assert compiler.read_entry(path) is None and not path.exists()
    compiler.write_entry(path, payload)
    b = bytearray(path.read_bytes())
    b[-1] ^= 0xFF  # one flipped bit
    path.write_bytes(bytes(b))
    assert compiler.read_entry(path) is None
    path.write_bytes(b"garbage")
    assert compiler.read_entry(path) is None
    assert "corrupt" in caplog.text


def test_cache_dir_env_override(tmp_path, monkeypatch):
    monkeypatch.setenv(compiler.CACHE_ENV, str(tmp_path / "c"))
    assert compiler.cache_dir() == tmp_path / "c"
    monkeypatch.delenv(compiler.CACHE_ENV)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    assert compiler.cache_dir() == tmp_path / "mace_accel"


def test_key_depends_on_source_arch_and_toolkit():
    k = compiler.cache_key("src", ("-O3",), "sm_90", "nvrtc13.0")
    assert k != compiler.cache_key("src2", ("-O3",), "sm_90", "nvrtc13.0")
    assert k != compiler.cache_key("src", ("-O3",), "sm_80", "nvrtc13.0")
    assert k != compiler.cache_key("src", ("-O3",), "sm_90", "nvrtc12.8")
    assert k != compiler.cache_key("src", (), "sm_90", "nvrtc13.0")


def _writer(args):
    path, seed = args
    payload = bytes([seed % 256]) * 200_000
    for _ in range(20):
        compiler.write_entry(path, payload)
        got = compiler.read_entry(path)
        assert got is None or len(got) == 200_000  # never a partial entry
    return True


def test_concurrent_writers_never_expose_partial_entries(tmp_path):
    path = tmp_path / "shared.cubin"
    with mp.get_context("spawn").Pool(2) as pool:
        assert all(pool.map(_writer, [(path, 1), (path, 2), (path, 3), (path, 4)]))
    assert len(compiler.read_entry(path)) == 200_000
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]


NVRTC_13_ARCHS = (75, 80, 86, 87, 88, 89, 90, 100, 103, 110, 120, 121)


def test_target_is_the_gpus_own_cubin_or_ptx_for_a_gpu_newer_than_nvrtc():
    assert compiler.choose_arch(90, NVRTC_13_ARCHS) == "sm_90"
    assert compiler.choose_arch(80, NVRTC_13_ARCHS) == "sm_80"
    # a GPU this NVRTC does not know: PTX for the newest architecture it knows, compiled by the driver on load
    assert compiler.choose_arch(130, NVRTC_13_ARCHS) == "compute_121"
    assert compiler.choose_arch(91, NVRTC_13_ARCHS) == "compute_90"
    with pytest.raises(compiler.KernelCompileError, match="older than every architecture"):
        compiler.choose_arch(70, NVRTC_13_ARCHS)
    assert compiler.is_ptx_target("compute_80") and not compiler.is_ptx_target("sm_90")
    assert compiler._cuda_version(13000) == "13.0" and compiler._cuda_version(12080) == "12.8"


def test_target_override_runs_older_code_paths_and_refuses_what_cannot_load():
    assert compiler.choose_arch(90, NVRTC_13_ARCHS, "compute_80") == "compute_80"
    assert compiler.choose_arch(90, NVRTC_13_ARCHS, " compute_75 ") == "compute_75"
    assert compiler.choose_arch(89, NVRTC_13_ARCHS, "sm_86") == "sm_86"  # same major: the cubin loads
    with pytest.raises(ValueError, match="newer than the GPU"):
        compiler.choose_arch(90, NVRTC_13_ARCHS, "compute_100")
    with pytest.raises(ValueError, match="another major architecture"):
        compiler.choose_arch(90, NVRTC_13_ARCHS, "sm_80")
    with pytest.raises(ValueError, match="supports architectures"):
        compiler.choose_arch(90, NVRTC_13_ARCHS, "compute_70")
    for bad in ("90", "sm90", "compute_8", "ampere", ""):
        with pytest.raises(ValueError, match="not an NVRTC target"):
            compiler.parse_arch(bad)
    with pytest.raises(ValueError, match=compiler.ARCH_ENV):
        compiler.choose_arch(90, NVRTC_13_ARCHS, "sm-90")


def test_target_override_from_the_environment_and_its_context_manager():
    code = "from mace_accel.backends.cuda import compiler; print(compiler.arch_override())"
    env = dict(os.environ, **{compiler.ARCH_ENV: "compute_80"})
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "compute_80"

    from mace_accel.backends import cuda as B

    before = compiler.arch_override()
    B._FUNCS[("probe", None, 0)] = object()
    with B.target_arch_override("compute_75"):
        assert compiler.arch_override() == "compute_75" and ("probe", None, 0) not in B._FUNCS
        B._FUNCS[("probe", None, 0)] = object()  # loaded for compute_75: forgotten on exit
    assert compiler.arch_override() == before and ("probe", None, 0) not in B._FUNCS
    with pytest.raises(ValueError, match="not an NVRTC target"):
        with B.target_arch_override("volta"):
            pass
    assert compiler.arch_override() == before
