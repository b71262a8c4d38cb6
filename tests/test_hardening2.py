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


# ---- trusted hosts (DNS rebinding), security headers ---------------------------------------------


@pytest.fixture(scope="module")
def demo_pipe():
    from seg_rt.demo.model import weights_dir
    from seg_rt.pipeline import load_pipeline

    return load_pipeline(str(weights_dir()), "cpu")


def _app(pipe, **cfg):
    from PIL import Image

    from seg_rt.cluster.serving.config import ServeConfig
    from seg_rt.cluster.serving.core import ServingCore
    from seg_rt.cluster.serving.http import build_app
    from seg_rt.demo.model import weights_dir

    def run(pipe_, rows, engine):
        return [Image.new("RGB", (p.width, p.height), (128, 128, 128)) for p in rows]

    return build_app(ServingCore(ServeConfig(model=str(weights_dir()), **cfg), pipe, run=run))


BODY = {"prompt": "a red circle", "steps": 1, "response": "json"}


def test_foreign_host_refused_on_every_route(demo_pipe):
    """A rebinding page's requests carry its own name as Host: refused (400) on every route,
    in each API's error shape; loopback names and configured names are answered."""
    from fastapi.testclient import TestClient

    c = TestClient(_app(demo_pipe), base_url="http://evil.example:8000")
    for path in ("/", "/v1/health", "/v1/info", "/metrics", "/v1/models", "/sdapi/v1/sd-models", "/no-such"):
        r = c.get(path)
        assert r.status_code == 400 and "evil.example" in r.text, (path, r.status_code, r.text)
    assert c.post("/v1/generate", json=BODY).status_code == 400
    assert (
        c.post("/v1/images/generations", json={"prompt": "a"}).json()["error"]["message"].startswith("Host")
    )
    for base in ("http://127.0.0.1:8000", "http://localhost:8000", "http://[::1]:8000"):
        assert TestClient(_app(demo_pipe), base_url=base).post("/v1/generate", json=BODY).status_code == 200
    named = TestClient(_app(demo_pipe, trusted_hosts=["gpu-box.lan"]), base_url="http://GPU-box.lan:8000")
    assert named.get("/v1/info").status_code == 200


def test_trusted_hosts_rule():
    from seg_rt.cluster.serving.guard import trusted_hosts

    assert trusted_hosts("127.0.0.1") == {"127.0.0.1", "localhost", "::1"}
    assert "10.0.0.5" in trusted_hosts("10.0.0.5") and "evil.example" not in trusted_hosts("10.0.0.5")
    assert trusted_hosts("0.0.0.0") is None  # wildcard bind (needs a key): any Host
    assert trusted_hosts("0.0.0.0", ["box.lan"]) == {"box.lan", "127.0.0.1", "localhost", "::1"}


def test_playground_has_csp_and_no_framing(demo_pipe):
    import base64
    import hashlib
    import re

    from fastapi.testclient import TestClient

    r = TestClient(_app(demo_pipe)).get("/")
    assert r.status_code == 200 and r.headers["x-frame-options"] == "DENY"
    csp = r.headers["content-security-policy"]
    assert "frame-ancestors 'none'" in csp and "default-src 'none'" in csp and "unsafe-eval" not in csp
    (script,) = re.findall(r"<script>(.*?)</script>", r.text, re.S)  # the page's own script, allowed by hash
    digest = base64.b64encode(hashlib.sha256(script.encode()).digest()).decode()
    assert f"'sha256-{digest}'" in csp
    api = TestClient(_app(demo_pipe)).get("/v1/health")
    assert api.headers["x-content-type-options"] == "nosniff" and "content-security-policy" not in api.headers


# ---- the API key off the command line ------------------------------------------------------------


def _serve_keys(monkeypatch, argv, env=None) -> list[str]:
    """The keys ``seg-rt serve`` would start with (serving stubbed out)."""
    import seg_rt.cluster.serving.deployment as deployment

    seen = {}
    monkeypatch.setattr(deployment, "serve_forever", lambda cfg, **k: seen.setdefault("keys", cfg.api_keys))
    if env is None:
        monkeypatch.delenv("SEG_RT_API_KEY", raising=False)
    else:
        monkeypatch.setenv("SEG_RT_API_KEY", env)
    assert main(["serve", *argv]) == 0
    return seen["keys"]


def test_api_key_file_env_and_flag_warning(monkeypatch, capsys, tmp_path):
    keys = tmp_path / "keys"
    keys.write_text("# serving keys\nkey-one\n\nkey-two\n")
    keys.chmod(0o600)
    assert _serve_keys(monkeypatch, ["--api-key-file", str(keys)]) == ["key-one", "key-two"]
    err = capsys.readouterr().err
    assert "warning" not in err and "key-one" not in err
    assert _serve_keys(monkeypatch, [], env="env-key") == ["env-key"]
    assert "warning" not in capsys.readouterr().err
    assert _serve_keys(monkeypatch, ["--api-key", "flag-key"]) == ["flag-key"]
    assert "--api-key is readable by every local user" in capsys.readouterr().err
    keys.chmod(0o644)
    _serve_keys(monkeypatch, ["--api-key-file", str(keys)])
    assert "readable by other users" in capsys.readouterr().err
    empty = tmp_path / "empty"
    empty.write_text("# none\n")
    assert main(["serve", "--api-key-file", str(empty)]) == 2
    assert "holds no key" in capsys.readouterr().err


# ---- deep nesting: one line, not a RecursionError ------------------------------------------------

DEEP_JSON = "[" * 5000 + "]" * 5000
DEEP_YAML = "a: " + "[" * 5000 + "]" * 5000 + "\n"


def test_safe_loader_refuses_deep_nesting_and_keeps_shallow_values():
    from seg_rt.safe_load import MAX_DEPTH, loads_json, safe_load_yaml

    for load, text in ((loads_json, DEEP_JSON), (safe_load_yaml, DEEP_YAML)):
        with pytest.raises(ValueError, match="nested deeper than"):
            load(text, "f")
    just = "[" * MAX_DEPTH + "]" * MAX_DEPTH
    assert loads_json(just, "f") is not None
    with pytest.raises(ValueError, match="nested deeper than"):
        loads_json("[" + just + "]", "f")
    # YAML aliases: shared nodes (billion laughs) and a cycle stay cheap and bounded
    laughs = "a: &a [1,1,1,1,1,1,1,1,1]\n" + "".join(
        f"{chr(98 + i)}: &{chr(98 + i)} [{', '.join([f'*{chr(97 + i)}'] * 9)}]\n" for i in range(8)
    )
    assert safe_load_yaml(laughs, "f")["i"][0][0][0] is not None
    with pytest.raises(ValueError, match="nested deeper than"):
        safe_load_yaml("a: &a [*a]\n", "f")


def _deep_files(tmp_path):
    from seg_rt.demo.model import weights_dir

    model = tmp_path / "model"
    import shutil

    shutil.copytree(weights_dir(), model)
    (model / "model_index.json").write_text(DEEP_JSON)
    return model


def test_deep_model_index_is_one_line_before_loading(tmp_path, capsys):
    model = _deep_files(tmp_path)
    rc = main(
        ["generate", "--model", str(model), "--steps", "1", "--no-progress", "--out", str(tmp_path / "o.png")]
    )
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and "nested deeper than" in err[0] and "model_index.json" in err[0], err


def test_deep_sidecar_is_one_line(tmp_path):
    from seg_rt.artifacts import ArtifactInfo

    with pytest.raises(ValueError, match="nested deeper than"):
        ArtifactInfo.from_json(DEEP_JSON, "seg_rt.json")


def test_deep_job_yaml_and_jsonl_line_and_serve_config_are_one_line(tmp_path, capsys):
    job = tmp_path / "job.yaml"
    job.write_text(f"model: org/name\noutput: {tmp_path / 'out'}\nprompts: " + "[" * 5000 + "]" * 5000 + "\n")
    line = _one_line_without_secret(capsys, main(["run", str(job)]))  # before Ray starts
    assert "nested deeper than" in line and "job.yaml" in line
    from seg_rt.cluster.jobs.spec import load_job, read_prompts

    prompts = tmp_path / "p.jsonl"
    prompts.write_text('{"prompt": "a"}\n{"prompt": "b", "x": ' + DEEP_JSON + "}\n")
    job.write_text(f"model: org/name\noutput: {tmp_path / 'out'}\nprompts_file: p.jsonl\n")
    spec, base = load_job(job)
    with pytest.raises(ValueError, match=r"p.jsonl:2: nested deeper than"):
        read_prompts(spec, base)
    config = tmp_path / "serve.yaml"
    config.write_text(DEEP_YAML)
    line = _one_line_without_secret(capsys, main(["serve", "--config", str(config)]))
    assert "nested deeper than" in line and "serve.yaml" in line
