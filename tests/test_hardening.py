"""Hardening: seg-rt writes only into folders it owns, confines sidecar paths, and treats model
folders, job files and manifests as untrusted input (docs/security.md lists each guarantee)."""

from __future__ import annotations

import json
import os
import shlex
from pathlib import Path

import pytest

from seg_rt import artifacts
from seg_rt.artifacts import SIDECAR, ArtifactInfo, is_export_folder, read_info, staged_dir
from seg_rt.cli import main


def _info(**kw) -> ArtifactInfo:
    base = dict(kind="onnx", family="sd15", model="m", height=64, width=64, latent_height=8, latent_width=8,
                batch=1, branches=("uncond", "cond", "seg"), input_names=("sample",), output_names=("out_sample",),
                dtype="float32", sigma=2.0, layers=("mid",), layer_names=("x",), blur_lengths=(), opset=18,
                file="model.onnx")  # fmt: skip
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
        rc = main(
            [
                "export",
                "onnx",
                "--model",
                str(model),
                "--height",
                "64",
                "--width",
                "64",
                "--out",
                str(model),
                *extra,
            ]
        )
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


# -- 3. submit: staging, entrypoint, output, token --------------------------------------------


def _job_dir(tmp_path: Path, **over) -> Path:
    import yaml

    folder = tmp_path / "jobs"
    folder.mkdir()
    data = {
        "model": "/models/m",
        "seg": {"scale": 3.0, "sigma": 2.0},
        "prompts": ["a"],
        "output": "/data/out",
        **over,
    }
    if "prompts_file" in over:
        del data["prompts"]
    path = folder / "job.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def _submit_refused(tmp_path, monkeypatch, job: Path, match: str) -> None:
    """``submit`` raises before any Ray client is built and leaves nothing in the temp dir."""
    from ray import job_submission

    from seg_rt.cluster.jobs import submit as sub

    staging_root = tmp_path / "tmp"
    staging_root.mkdir()
    monkeypatch.setattr(sub.tempfile, "tempdir", str(staging_root))

    def no_ray(*a, **k):
        raise AssertionError("Ray was contacted")

    monkeypatch.setattr(job_submission, "JobSubmissionClient", no_ray)
    with pytest.raises(ValueError, match=match):
        sub.submit(job, "http://127.0.0.1:1")
    assert list(staging_root.iterdir()) == []


def test_submit_refuses_prompts_file_outside_job_folder(tmp_path, monkeypatch):
    (tmp_path / "x").write_text("a cat\n")
    before = sorted(p.name for p in tmp_path.iterdir())
    job = _job_dir(tmp_path, prompts_file="../x")
    _submit_refused(tmp_path, monkeypatch, job, "prompts_file: '../x' leaves the job's folder")
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([*before, "jobs", "tmp"])
    assert (tmp_path / "x").read_text() == "a cat\n"


def test_submit_refuses_prompts_symlink_escape(tmp_path, monkeypatch):
    secret = tmp_path / "secret.txt"
    secret.write_text("do not upload\n")
    job = _job_dir(tmp_path, prompts_file="p.txt")
    (job.parent / "p.txt").symlink_to(secret)
    _submit_refused(tmp_path, monkeypatch, job, "leaves the job's folder")


def test_submit_refuses_relative_output(tmp_path, monkeypatch):
    job = _job_dir(tmp_path, output="out")
    _submit_refused(tmp_path, monkeypatch, job, "output: submit needs an absolute path")


def test_submit_entrypoint_quotes_the_job_name():
    from seg_rt.cluster.jobs.submit import entrypoint

    name = "my job; touch pwned.yaml"
    argv = shlex.split(entrypoint(name))
    assert argv == ["seg-rt", "run", name, "--address", "auto", "--no-progress"]


def test_submit_does_not_store_the_token(tmp_path, monkeypatch):
    from ray import job_submission

    from seg_rt.cluster.jobs import submit as sub

    sent = {}

    class FakeClient:
        def __init__(self, address):
            pass

        def submit_job(self, **kw):
            sent.update(kw)
            assert (Path(kw["runtime_env"]["working_dir"]) / "job; x.yaml").is_file()
            return "raysubmit_1"

    monkeypatch.setenv("RAY_AUTH_MODE", "token")
    monkeypatch.setenv("RAY_AUTH_TOKEN", "s3cret")
    monkeypatch.setattr(job_submission, "JobSubmissionClient", FakeClient)
    job = _job_dir(tmp_path)
    job = job.rename(job.parent / "job; x.yaml")
    assert sub.submit(job, "http://127.0.0.1:1") == ("raysubmit_1", None)
    assert "s3cret" not in json.dumps(sent)
    assert sent["runtime_env"]["env_vars"] == {"RAY_AUTH_MODE": "token"}
    assert shlex.split(sent["entrypoint"])[2] == "job; x.yaml"


# -- 4. a local Ray seg-rt starts is private -----------------------------------------------------


@pytest.fixture
def ray_auth_config_restored():
    """start_ray makes Ray re-read its (cached) auth settings from the environment; after
    monkeypatch restores the environment, make Ray re-read them again, or a later ray.init in this
    process speaks token auth with a token that no longer exists."""
    yield
    from seg_rt.cluster.jobs.driver import refresh_ray_auth

    refresh_ray_auth()


def test_local_ray_uses_token_auth_and_private_temp_dir(ray_auth_config_restored, tmp_path, monkeypatch):
    import ray

    from seg_rt.cluster.jobs import driver

    seen = {}

    def fake_init(**kw):
        seen.update(kw, mode=os.environ.get("RAY_AUTH_MODE"), token=os.environ.get("RAY_AUTH_TOKEN"))

    monkeypatch.delenv("RAY_AUTH_TOKEN", raising=False)
    monkeypatch.setenv("RAY_AUTH_MODE", "disabled")
    monkeypatch.setattr(ray, "is_initialized", lambda: False)
    monkeypatch.setattr(ray, "init", fake_init)
    driver.start_ray(None, num_cpus=1, temp_dir=str(tmp_path / "rt"))
    assert seen["mode"] == "token" and len(seen["token"]) >= 32
    private = Path(seen["_temp_dir"]).parent  # Ray chmods its own temp dir 0777: the folder around it is ours
    assert private.parent == tmp_path / "rt" and (private.stat().st_mode & 0o777) == 0o700
    assert seen["_node_ip_address"] in (driver.LOOPBACK_NODE_IP, None) and not seen["include_dashboard"]


# -- 6. manifest ---------------------------------------------------------------------------------


def _ok_row(output: Path, item: str, data: bytes = b"png") -> dict:
    from seg_rt.cluster.storage import LocalStore

    from .manifest_rows import ok_row

    return ok_row(LocalStore(output), item, data)


def test_torn_manifest_line_does_not_swallow_the_next_row(tmp_path):
    from seg_rt.cluster.jobs.driver import MANIFEST, Manifest, completed

    a, b = _ok_row(tmp_path, "a"), _ok_row(tmp_path, "b")
    (tmp_path / MANIFEST).write_text(json.dumps(a) + "\n" + json.dumps(b)[:20])  # killed mid-write
    m = Manifest(tmp_path)
    m.append(b)
    m.close()
    assert completed(tmp_path) == {"a", "b"}


def test_garbage_manifest_lines_are_skipped_with_one_warning(tmp_path, caplog):
    from seg_rt.cluster.jobs.driver import MANIFEST, completed

    a = _ok_row(tmp_path, "a")
    lines = ["[1, 2]", "42", "not json", '"str"', "null", json.dumps(a), '{"no": "item"}']
    (tmp_path / MANIFEST).write_text("\n".join(lines) + "\n")
    with caplog.at_level("WARNING"):
        assert completed(tmp_path) == {"a"}
    warnings = [r for r in caplog.records if r.levelname == "WARNING"]
    assert len(warnings) == 1 and "skipped 6 unreadable line(s)" in warnings[0].getMessage()


def test_ok_row_with_missing_or_changed_file_is_redone(tmp_path):
    from seg_rt.cluster.jobs.driver import Manifest, completed

    rows = [_ok_row(tmp_path, k) for k in ("kept", "missing", "changed", "same_size", "old_row")]
    (tmp_path / "images" / "missing.png").unlink()
    (tmp_path / "images" / "changed.png").write_bytes(b"longer png")
    (tmp_path / "images" / "same_size.png").write_bytes(b"PNG")
    del rows[4]["sha256"]
    m = Manifest(tmp_path)
    for r in rows:
        m.append(r)
    m.append({**_ok_row(tmp_path, "escape"), "path": "../../etc/passwd"})
    m.close()
    assert completed(tmp_path) == {"kept"}


def test_symlinked_manifest_refused(tmp_path):
    from seg_rt.cluster.jobs.driver import MANIFEST, Manifest, read_manifest

    target = tmp_path / "elsewhere.txt"
    target.write_text("precious\n")
    out = tmp_path / "out"
    out.mkdir()
    (out / MANIFEST).symlink_to(target)
    with pytest.raises(ValueError, match="symbolic link"):
        Manifest(out)
    with pytest.raises(ValueError, match="symbolic link"):
        read_manifest(out)
    assert target.read_text() == "precious\n"


def test_write_atomic_fsyncs_file_and_folder(tmp_path, monkeypatch):
    from seg_rt import images

    synced = []
    real = os.fsync
    monkeypatch.setattr(
        images.os, "fsync", lambda fd: synced.append(os.readlink(f"/proc/self/fd/{fd}")) or real(fd)
    )
    images.write_atomic(tmp_path / "a" / "x.png", b"data")
    assert (tmp_path / "a" / "x.png").read_bytes() == b"data"
    assert (
        len(synced) == 2
        and synced[0].startswith(str(tmp_path / "a" / ".x.png."))
        and synced[1] == str(tmp_path / "a")
    )


# -- 9. model folders run no code ----------------------------------------------------------------


def _custom_model(folder: Path, index: dict) -> Path:
    folder.mkdir()
    (folder / "model_index.json").write_text(json.dumps(index))
    marker = folder.parent / "ran"
    code = f"open({str(marker)!r}, 'w').close()\nclass Evil:\n    pass\n"
    for name in ("evil.py", "pipeline.py", "my_unet.py"):
        (folder / name).write_text(code)
    (folder / "unet").mkdir()
    (folder / "unet" / "my_unet.py").write_text(code)
    return folder


@pytest.mark.parametrize(
    ("index", "message"),
    [
        (
            {"_class_name": ["pipeline", "Evil"], "unet": ["diffusers", "UNet2DConditionModel"]},
            "pipeline class",
        ),
        ({"_class_name": "Evil", "unet": ["diffusers", "UNet2DConditionModel"]}, "pipeline class 'Evil'"),
        (
            {"_class_name": "StableDiffusionPipeline", "unet": ["my_unet", "Evil"]},
            "component 'unet' names my_unet.Evil",
        ),
        ({"_class_name": "StableDiffusionPipeline", "unet": ["diffusers", "Evil"]}, "component 'unet'"),
        ({"_class_name": "StableDiffusionPipeline", "text_encoder": ["transformers", "os"]}, "text_encoder"),
    ],
)
def test_model_folder_with_custom_class_refused_before_code_runs(tmp_path, index, message):
    from seg_rt.errors import ModelLoadError
    from seg_rt.pipeline import load_pipeline

    folder = _custom_model(tmp_path / "m", index)
    with pytest.raises(ModelLoadError, match=message) as info:
        load_pipeline(folder, "cpu")
    assert "seg-rt loads no custom code" in str(info.value) and "\n" not in str(info.value)
    assert not (tmp_path / "ran").exists()


def test_known_classes_pass_the_model_index_check(tmp_path):
    from seg_rt.demo.model import SEGDemoPipeline
    from seg_rt.pipeline import check_model_index

    for index in (
        {
            "_class_name": "StableDiffusionXLPipeline",
            "unet": ["diffusers", "UNet2DConditionModel"],
            "text_encoder": ["transformers", "CLIPTextModel"],
            "image_encoder": [None, None],
            "safety_checker": ["stable_diffusion", "StableDiffusionSafetyChecker"],
            "force_zeros_for_empty_prompt": True,
        },
        {"_class_name": SEGDemoPipeline.__name__, "scheduler": ["diffusers", "EulerDiscreteScheduler"]},
    ):
        (tmp_path / "model_index.json").write_text(json.dumps(index))
        check_model_index(tmp_path / "model_index.json")
