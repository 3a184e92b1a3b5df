"""CPU: the on-disk kernel cache detects corrupt and truncated entries and writes atomically."""
import multiprocessing as mp
import os

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
