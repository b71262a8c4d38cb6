"""Hardening round 2 (issue #27): credentials in model URLs, trusted hosts, the API key on the
command line, inputs that ended in a traceback, unbounded work (docs/security.md lists each
guarantee with its test)."""

from __future__ import annotations

import pytest

from seg_rt.cli import main

SECRET = "wJalrXUtnFEMIK7MDENGbPxRfiCYSECRET"
CRED_URLS = (
    f"s3://AKIAEXAMPLE:{SECRET}@bucket/models/sdxl",
    f"https://user:{SECRET}@host.example/models/sdxl",
    f"s3://bucket/models/sdxl?X-Amz-Signature={SECRET}",
    f"https://host.example/models/sdxl#{SECRET}",
)


def _one_line_without_secret(capsys, rc: int) -> str:
    err = capsys.readouterr().err
    lines = [line for line in err.strip().splitlines() if line.strip()]
    assert rc == 2 and len(lines) == 1, err
    assert SECRET not in err and "AKIAEXAMPLE" not in err, err
    return lines[0]


# ---- credentials in model URLs -------------------------------------------------------------------


@pytest.mark.parametrize("url", CRED_URLS)
def test_model_url_rule_refuses_credentials_without_echoing_them(url):
    from seg_rt.model_refs import check_model_url, redact

    with pytest.raises(ValueError, match="carries credentials or query options") as exc:
        check_model_url(url)
    assert SECRET not in str(exc.value)
    assert SECRET not in redact(f"failed: {url} (and again '{url}')")
    assert check_model_url("s3://bucket/models/sdxl") == "s3://bucket/models/sdxl"


def test_public_name_is_never_a_url_nor_a_path(tmp_path):
    from seg_rt.demo.model import weights_dir
    from seg_rt.model_refs import public_name

    assert public_name("s3://bucket/models/sdxl/") == "sdxl"
    assert public_name("gs://bucket") == "bucket"
    assert public_name("org/name") == "org/name"
    folder = tmp_path / "my-model"
    folder.mkdir()
    assert public_name(folder) == "my-model" and public_name(f"file://{folder}") == "my-model"
    assert public_name(weights_dir()) == "seg-rt-demo"


@pytest.mark.parametrize("url", CRED_URLS[:3])
def test_serve_refuses_a_credential_bearing_model_url(url, capsys, monkeypatch):
    """Refused while the config is read (before Ray starts), one line without the secret."""
    import seg_rt.cluster.jobs.driver as driver

    monkeypatch.setattr(driver, "start_ray", lambda *a, **k: pytest.fail("Ray started"))
    line = _one_line_without_secret(capsys, main(["serve", "--model", url]))
    assert "model URL" in line and "carries credentials" in line


def test_serve_config_public_model_of_a_url_is_its_last_segment():
    from seg_rt.cluster.serving.config import ServeConfig

    assert ServeConfig(model="s3://bucket/models/sdxl").public_model == "sdxl"


@pytest.mark.parametrize("command", ["generate", "video"])
def test_branch_parallel_model_url_with_credentials_refused(command, capsys, tmp_path):
    out = tmp_path / ("o.png" if command == "generate" else "o.mp4")
    argv = [command, "--model", CRED_URLS[0], "--branch-parallel", "2", "--out", str(out)]
    line = _one_line_without_secret(capsys, main(argv))
    assert "carries credentials" in line
    assert not list(tmp_path.iterdir())


def test_job_model_url_with_credentials_refused():
    from seg_rt.cluster.jobs.spec import parse_job

    for url in CRED_URLS[:3]:
        with pytest.raises(ValueError) as exc:
            parse_job({"model": url, "prompts": ["a"], "output": "/tmp/o"})
        assert SECRET not in str(exc.value) and "carries credentials" in str(exc.value)


def test_fetch_model_refuses_credentials_and_redacts_library_errors(tmp_path, monkeypatch):
    pytest.importorskip("fsspec")
    from seg_rt.cluster import storage

    with pytest.raises(ValueError) as exc:
        storage.fetch_model(CRED_URLS[0], tmp_path)
    assert SECRET not in str(exc.value)

    def leaky(fsspec, url, cache_dir):  # a library error that quotes a signed URL
        raise RuntimeError(f"403 Forbidden for https://bucket.s3/x?X-Amz-Signature={SECRET}\ndetails")

    monkeypatch.setattr(storage, "_fetch", leaky)
    with pytest.raises(OSError) as exc:
        storage.fetch_model("s3://bucket/models/sdxl", tmp_path)
    assert SECRET not in str(exc.value) and "403 Forbidden" in str(exc.value)
    assert "\n" not in str(exc.value)
