"""The ``mace-accel`` command line (convert, demo) and ``scripts/convert_checkpoint.py``."""
from __future__ import annotations

import copy
import functools
import io
import os
import pickletools
import runpy
import sys
import zipfile
from pathlib import Path

import pytest
import torch

import mace_accel  # noqa: F401
from mace_accel.cli import main
from mace_accel.surgery import MARKER, ModelLoadError, is_accelerated, load_model, probe_atoms
from mace_accel.surgery.parity import evaluate
from mace_accel.surgery.random_models import build_random_mace

REPO = Path(__file__).resolve().parents[1]
F64 = torch.float64


@functools.lru_cache(maxsize=None)
def _model():
    return build_random_mace("mp-medium", channels=8)


@pytest.fixture
def model_file(tmp_path):
    path = tmp_path / "in.model"
    torch.save(copy.deepcopy(_model()), path)
    return path


def _class_names(m):
    return {n: f"{type(x).__module__}.{type(x).__qualname__}" for n, x in m.named_modules()}


def _pickle_strings(path):
    with zipfile.ZipFile(path) as z:
        data = z.read([n for n in z.namelist() if n.endswith("data.pkl")][0])
    return {arg for _, arg, _ in pickletools.genops(io.BytesIO(data)) if isinstance(arg, str)}


def test_convert_then_back_to_e3nn(model_file, tmp_path, capsys):
    out = tmp_path / "acc.model"
    assert main(["convert", str(model_file), str(out)]) == 0
    text = capsys.readouterr().out
    assert "checking parity" in text and "parity ok" in text and f"wrote {out}" in text

    acc = torch.load(out, weights_only=False)
    assert is_accelerated(acc) and getattr(acc, MARKER) == mace_accel.__version__
    assert not any(s.startswith("cupy") or "backends.cuda" in s for s in _pickle_strings(out))

    back = tmp_path / "back.model"
    assert main(["convert", str(out), str(back), "--to-e3nn"]) == 0
    assert "parity ok" in capsys.readouterr().out
    plain = torch.load(back, weights_only=False)
    original = torch.load(model_file, weights_only=False)
    assert not is_accelerated(plain) and _class_names(plain) == _class_names(original)
    sp, so = plain.state_dict(), original.state_dict()
    assert sp.keys() == so.keys() and all(torch.equal(sp[k], so[k]) for k in sp)
    atoms = probe_atoms(original)
    r0, r1, r2 = evaluate(original, atoms, F64), evaluate(plain, atoms, F64), evaluate(acc, atoms, F64)
    assert torch.equal(r0["forces"], r1["forces"]) and torch.equal(r0["energy"], r1["energy"])
    assert float((r0["forces"] - r2["forces"]).abs().max()) <= 1e-10 * float(r0["forces"].abs().max())


def test_convert_float32_and_no_check(model_file, tmp_path, capsys):
    out = tmp_path / "acc32.model"
    assert main(["convert", str(model_file), str(out), "--dtype", "float32"]) == 0
    assert "float32" in capsys.readouterr().out
    assert all(p.dtype == torch.float32 for p in torch.load(out, weights_only=False).parameters())
    out2 = tmp_path / "nocheck.model"
    assert main(["convert", str(model_file), str(out2), "--no-check"]) == 0
    assert "checking parity" not in capsys.readouterr().out and out2.exists()


def test_refuses_to_overwrite_input(model_file, tmp_path, capsys):
    before = model_file.read_bytes()
    link = tmp_path / "link.model"
    link.symlink_to(model_file)
    hard = tmp_path / "hard.model"
    os.link(model_file, hard)
    dotted = tmp_path / "sub" / ".." / model_file.name
    (tmp_path / "sub").mkdir()
    for target in (model_file, link, hard, dotted):
        for extra in ([], ["--force"]):
            assert main(["convert", str(model_file), str(target), *extra]) == 1
            assert "refusing to overwrite the input" in capsys.readouterr().err
    # the link as input, the real file as output
    assert main(["convert", str(link), str(model_file), "--force"]) == 1
    assert "refusing to overwrite the input" in capsys.readouterr().err
    assert model_file.read_bytes() == before


def test_refuses_existing_output_without_force(model_file, tmp_path, capsys):
    out = tmp_path / "exists.model"
    out.write_bytes(b"keep me")
    assert main(["convert", str(model_file), str(out)]) == 1
    assert "already exists" in capsys.readouterr().err and out.read_bytes() == b"keep me"
    assert main(["convert", str(model_file), str(out), "--force", "--no-check"]) == 0
    assert is_accelerated(torch.load(out, weights_only=False))
    assert not list(tmp_path.glob(".exists.model.*"))  # no temporary file left behind


@pytest.mark.parametrize("case", ["missing", "corrupt", "truncated", "state_dict", "directory", "not_a_module"])
def test_bad_inputs_give_clear_errors(case, model_file, tmp_path, capsys):
    src = tmp_path / f"{case}.model"
    expect = {
        "missing": "no such file",
        "corrupt": "could not load",
        "truncated": "could not load",
        "state_dict": "not a whole model",
        "directory": "is a directory",
        "not_a_module": "not a torch.nn.Module",
    }[case]
    if case == "corrupt":
        src.write_bytes(os.urandom(2048))
    elif case == "truncated":
        src.write_bytes(model_file.read_bytes()[:5000])
    elif case == "state_dict":
        torch.save(_model().state_dict(), src)
    elif case == "directory":
        src.mkdir()
    elif case == "not_a_module":
        torch.save([1, 2, 3], src)
    out = tmp_path / "out.model"
    assert main(["convert", str(src), str(out)]) == 1
    err = capsys.readouterr().err
    assert err.startswith("mace-accel convert: error:") and expect in err, err
    assert "Traceback" not in err and not out.exists()


def test_missing_cuequivariance_package_is_explained(tmp_path, monkeypatch):
    # a pickle that refers to cuequivariance_torch, which is not installed here
    import types

    fake = types.ModuleType("cuequivariance_torch")

    class Linear(torch.nn.Module):
        pass

    Linear.__module__ = "cuequivariance_torch"
    Linear.__qualname__ = "Linear"
    fake.Linear = Linear
    monkeypatch.setitem(sys.modules, "cuequivariance_torch", fake)
    path = tmp_path / "cueq.model"
    torch.save(torch.nn.Sequential(Linear()), path)
    monkeypatch.delitem(sys.modules, "cuequivariance_torch")
    with pytest.raises(ModelLoadError, match="cuEquivariance model") as ei:
        load_model(path)
    assert "convert_cueq_e3nn" in str(ei.value)


def test_usage_errors(capsys):
    assert main([]) == 2
    assert main(["convert"]) == 2
    assert main(["convert", "a", "b", "--dtype", "float16"]) == 2
    assert main(["frobnicate"]) == 2
    assert main(["--help"]) == 0
    capsys.readouterr()


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message on machines without CUDA")
def test_cuda_requested_without_gpu(model_file, tmp_path, capsys):
    assert main(["convert", str(model_file), str(tmp_path / "o.model"), "--device", "cuda"]) == 1
    assert "CUDA is not available" in capsys.readouterr().err
    assert main(["demo", "--device", "cuda", "--model", "random"]) == 1
    assert "no CUDA GPU" in capsys.readouterr().err


def test_script_wrapper_is_the_same_command(model_file, tmp_path, monkeypatch, capsys):
    out = tmp_path / "script.model"
    monkeypatch.setattr(sys, "argv", ["convert_checkpoint.py", str(model_file), str(out), "--no-check"])
    with pytest.raises(SystemExit) as ei:
        runpy.run_path(str(REPO / "scripts" / "convert_checkpoint.py"), run_name="__main__")
    assert ei.value.code == 0 and is_accelerated(torch.load(out, weights_only=False))
    monkeypatch.setattr(sys, "argv", ["convert_checkpoint.py", str(model_file), str(model_file)])
    with pytest.raises(SystemExit) as ei:
        runpy.run_path(str(REPO / "scripts" / "convert_checkpoint.py"), run_name="__main__")
    assert ei.value.code == 1 and "refusing to overwrite the input" in capsys.readouterr().err


def test_demo_on_cpu(capsys):
    assert main(["demo", "--steps", "2", "--device", "cpu", "--model", "random", "--size", "2"]) == 0
    out = capsys.readouterr().out
    assert "CPU reference backend" in out
    assert "ms/step" in out and "speed-up" in out and "parity" in out
    assert "parity ok" in out  # the conversion's check


def test_demo_with_a_model_file(model_file, capsys):
    assert main(["demo", "--steps", "1", "--device", "cpu", "--model", str(model_file), "--size", "2",
                 "--dtype", "float64"]) == 0
    out = capsys.readouterr().out
    assert f"loading {model_file}" in out and "max |dF|" in out
