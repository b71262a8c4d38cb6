"""Hardening: seg-rt writes only into folders it owns, confines sidecar paths, and treats model
folders, job files and manifests as untrusted input (docs/security.md lists each guarantee)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from seg_rt import artifacts
from seg_rt.artifacts import SIDECAR, ArtifactInfo, is_export_folder, read_info, staged_dir
from seg_rt.cli import main


def _info(**kw) -> ArtifactInfo:
    base = dict(
        kind="onnx", family="sd15", model="m", height=64, width=64, latent_height=8, latent_width=8,
        batch=1, branches=("uncond", "cond", "seg"), input_names=("sample",), output_names=("out_sample",),
        dtype="float32", sigma=2.0, layers=("mid",), layer_names=("x",), blur_lengths=(), opset=18,
        file="model.onnx",
    )  # fmt: skip
    return ArtifactInfo(**{**base, **kw})


def _artifact(folder: Path, payload: bytes = b"old") -> Path:
    folder.mkdir(parents=True)
    _info().write(folder)
    (folder / "model.onnx").write_bytes(payload)
    return folder


def _model_folder(folder: Path) -> Path:
    (folder / "unet").mkdir(parents=True)
    (folder / "model_index.json").write_text('{"_class_name": "StableDiffusionPipeline"}')
    (folder / "unet" / "diffusion_pytorch_model.safetensors").write_bytes(b"weights")
    return folder


def _snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


# -- 2. output folders ----------------------------------------------------------------------------


def test_export_out_dot_refused_and_nothing_deleted(tmp_path, monkeypatch, capsys):
    (tmp_path / "notes.txt").write_text("mine")
    model = _model_folder(tmp_path / "model")
    monkeypatch.chdir(tmp_path)
    before = _snapshot(tmp_path)
    args = ["export", "onnx", "--model", str(model), "--height", "64", "--width", "64"]
    assert main([*args, "--out", "."]) == 2
    assert "working directory" in capsys.readouterr().err
    assert main([*args, "--out", ".", "--overwrite"]) == 2
    assert _snapshot(tmp_path) == before


def test_export_out_model_folder_refused(tmp_path, capsys):
    model = _model_folder(tmp_path / "model")
    before = _snapshot(model)
    for extra in ([], ["--overwrite"]):
        rc = main(["export", "onnx", "--model", str(model), "--height", "64", "--width", "64",
                   "--out", str(model), *extra])  # fmt: skip
        assert rc == 2
        err = capsys.readouterr().err.strip()
        assert "is not a seg-rt export" in err and len(err.splitlines()) == 1
    assert _snapshot(model) == before


def test_export_out_with_user_file_refused(tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    (out / "thesis.tex").write_text("years of work")
    for extra in ([], ["--overwrite"]):
        rc = main(["export", "trt", "--onnx", str(tmp_path / "nope"), "--out", str(out), *extra])
        assert rc == 2
        assert "is not a seg-rt export" in capsys.readouterr().err
    assert (out / "thesis.tex").read_text() == "years of work"


def test_seg_rt_artifact_with_a_user_file_is_not_ours(tmp_path):
    folder = _artifact(tmp_path / "a")
    assert is_export_folder(folder)
    (folder / "notes.txt").write_text("mine")
    assert not is_export_folder(folder)
    with (
        pytest.raises(ValueError, match="not a seg-rt export"),
        staged_dir(folder, is_export_folder, overwrite=True),
    ):
        pass
    assert (folder / "notes.txt").is_file()


def test_existing_artifact_needs_overwrite(tmp_path):
    folder = _artifact(tmp_path / "a")
    with pytest.raises(ValueError, match="pass --overwrite"), staged_dir(folder, is_export_folder):
        pass
    assert (folder / "model.onnx").read_bytes() == b"old"


def _overwrite(folder: Path) -> None:
    old_ino = folder.stat().st_ino
    with staged_dir(folder, is_export_folder, overwrite=True) as tmp:
        assert tmp.parent == folder.parent and tmp != folder  # built beside, old untouched meanwhile
        assert (folder / "model.onnx").read_bytes() == b"old"
        _info().write(tmp)
        (tmp / "model.onnx").write_bytes(b"new")
    assert (folder / "model.onnx").read_bytes() == b"new"
    assert folder.stat().st_ino != old_ino
    assert sorted(p.name for p in folder.parent.iterdir()) == ["a"]  # old copy and temp folders gone


def test_overwrite_swaps_atomically(tmp_path, monkeypatch):
    calls = []
    real = artifacts._exchange
    monkeypatch.setattr(artifacts, "_exchange", lambda a, b: calls.append((a, b)) or real(a, b))
    _overwrite(_artifact(tmp_path / "a"))
    assert len(calls) == 1  # one renameat2(RENAME_EXCHANGE): the folder never goes missing


def test_overwrite_swaps_without_renameat2(tmp_path, monkeypatch):
    monkeypatch.setattr(artifacts, "_exchange", lambda a, b: False)
    _overwrite(_artifact(tmp_path / "a"))


def test_failed_write_keeps_old_artifact(tmp_path):
    folder = _artifact(tmp_path / "a")
    with pytest.raises(RuntimeError), staged_dir(folder, is_export_folder, overwrite=True) as tmp:
        (tmp / "model.onnx").write_bytes(b"half")
        raise RuntimeError("export failed")
    assert (folder / "model.onnx").read_bytes() == b"old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a"]


def test_empty_or_missing_out_is_fine(tmp_path):
    (tmp_path / "empty").mkdir()
    for name in ("empty", "missing/deeper"):
        with staged_dir(tmp_path / name, is_export_folder) as tmp:
            (tmp / "f").write_text("x")
        assert (tmp_path / name / "f").read_text() == "x"


def test_symlink_out_refused(tmp_path):
    target = _artifact(tmp_path / "a")
    (tmp_path / "link").symlink_to(target)
    with (
        pytest.raises(ValueError, match="symbolic link"),
        staged_dir(tmp_path / "link", is_export_folder, overwrite=True),
    ):
        pass
    assert (target / "model.onnx").read_bytes() == b"old"


def test_demo_trainer_refuses_foreign_out(tmp_path, capsys):
    from seg_rt.demo.train import main as train_main

    model = _model_folder(tmp_path / "model")
    before = _snapshot(model)
    rc = train_main(["--out", str(model), "--work-dir", str(tmp_path / "w"), "--steps", "1", "--overwrite"])
    assert rc == 2
    assert "not a seg-rt demo model" in capsys.readouterr().err
    assert _snapshot(model) == before and not (tmp_path / "w").exists()


# -- 8. sidecar confinement -----------------------------------------------------------------------


@pytest.mark.parametrize("name", ["../model.onnx", "/etc/passwd", "sub/model.onnx", "..", ""])
def test_sidecar_file_must_be_a_plain_name(tmp_path, name):
    folder = _artifact(tmp_path / "a")
    d = json.loads((folder / SIDECAR).read_text())
    (folder / SIDECAR).write_text(json.dumps({**d, "file": name}))
    with pytest.raises(ValueError, match="plain file name"):
        read_info(folder)


def test_sidecar_file_symlink_escape_refused(tmp_path):
    folder = _artifact(tmp_path / "a")
    (tmp_path / "secret").write_bytes(b"x")
    os.unlink(folder / "model.onnx")
    (folder / "model.onnx").symlink_to(tmp_path / "secret")
    with pytest.raises(ValueError, match="outside its folder"):
        read_info(folder)
