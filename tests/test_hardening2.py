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


# ---- serving inputs that were a 500, echoes capped, strict OpenAI types --------------------------


def test_lone_surrogate_prompt_is_a_422_naming_the_field(demo_pipe, capsys, tmp_path):
    from fastapi.testclient import TestClient

    c = TestClient(_app(demo_pipe))
    body = '{"prompt": "a \\ud800 b", "steps": 1, "response": "json"}'
    r = c.post("/v1/generate", content=body, headers={"content-type": "application/json"})
    assert r.status_code == 422 and "prompt" in r.text and "surrogate" in r.text, r.text
    r = c.post("/v1/images/generations", content=body.replace(', "response": "json"', ""),
               headers={"content-type": "application/json"})  # fmt: skip
    assert r.status_code == 400 and "surrogate" in r.json()["error"]["message"]
    neg = '{"prompt": "a", "negative_prompt": "\\udc80", "steps": 1}'
    r = c.post("/sdapi/v1/txt2img", content=neg, headers={"content-type": "application/json"})
    assert r.status_code == 422 and "negative prompt" in r.json()["detail"]
    rc = main(["generate", "--prompt", "a \udcff", "--steps", "1", "--out", str(tmp_path / "o.png")])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and "surrogate" in err[0] and not list(tmp_path.iterdir())


def test_a1111_override_settings_not_a_mapping_is_a_422(demo_pipe):
    from fastapi.testclient import TestClient

    c = TestClient(_app(demo_pipe))
    for bad in ([1, 2], "sd_model_checkpoint", 3):
        r = c.post("/sdapi/v1/txt2img", json={"prompt": "a", "steps": 1, "override_settings": bad})
        assert r.status_code == 422 and "override_settings must be a mapping" in r.json()["detail"], r.text


def test_error_bodies_cap_every_echoed_value(demo_pipe):
    from fastapi.testclient import TestClient

    c = TestClient(_app(demo_pipe, max_body_bytes=2_000_000))
    huge = "x" * 900_000
    cases = [
        ("/sdapi/v1/txt2img", {"prompt": "a", "sampler_name": huge}),
        ("/sdapi/v1/txt2img", {"prompt": "a", "styles": [huge]}),
        ("/sdapi/v1/txt2img", {"prompt": "a", huge: 1}),
        ("/sdapi/v1/txt2img", {"prompt": "a", "override_settings": {huge: huge}}),
        ("/sdapi/v1/txt2img", {"prompt": "a", "alwayson_scripts": {huge: {"args": [1]}}}),
        ("/v1/images/generations", {"prompt": "a", "size": huge}),
        ("/v1/images/generations", {"prompt": "a", "model": huge}),
        ("/v1/images/generations", {"prompt": "a", huge: 1}),
        ("/v1/generate", {"prompt": "a", "scheduler": huge}),
    ]
    for path, body in cases:
        r = c.post(path, json=body)
        assert 400 <= r.status_code < 500 and len(r.content) < 10_000, (path, r.status_code, len(r.content))


@pytest.mark.parametrize(
    "body, field",
    [
        ({"n": "2"}, "n"),
        ({"n": True}, "n"),
        ({"n": 1.0}, "n"),
        ({"size": "32x32\n"}, "size"),
        ({"size": "３２x32"}, "size"),
        ({"size": 32}, "size"),
    ],
)
def test_openai_mapping_has_strict_types(demo_pipe, body, field):
    from fastapi.testclient import TestClient

    r = TestClient(_app(demo_pipe)).post("/v1/images/generations", json={"prompt": "a", **body})
    assert r.status_code == 400 and r.json()["error"]["param"] == field, r.text


# ---- unbounded work ------------------------------------------------------------------------------


def test_a_10_to_the_12_item_job_is_refused_before_any_item_is_built(tmp_path, capsys, monkeypatch):
    """Refused while the job is read (before the 10**12 items, which would never finish building)."""
    import seg_rt.cluster.jobs.driver as driver

    monkeypatch.setattr(driver, "start_ray", lambda *a, **k: pytest.fail("Ray started"))
    job = tmp_path / "job.yaml"
    job.write_text(
        f"model: org/name\noutput: {tmp_path / 'out'}\nprompts: [a, b]\nsamples_per_prompt: {10**12}\n"
    )
    line = _one_line_without_secret(capsys, main(["run", str(job)]))
    assert "2000000000000 items, more than max_items 1000000" in line
    (tmp_path / "p.txt").write_text("a\nb\nc\n")
    job.write_text(
        f"model: org/name\noutput: {tmp_path / 'out'}\nprompts_file: p.txt\nsamples_per_prompt: 400000\n"
    )
    line = _one_line_without_secret(capsys, main(["run", str(job)]))
    assert "3 prompt(s) x samples_per_prompt 400000 = 1200000 items" in line
    from seg_rt.cluster.jobs.spec import expand_items, load_job

    job.write_text(
        f"model: org/name\noutput: {tmp_path / 'out'}\nprompts_file: p.txt\nsamples_per_prompt: 2\nmax_items: 6\n"
    )
    assert len(expand_items(*load_job(job))) == 6
    assert not (tmp_path / "out").exists()


# ---- late checks ---------------------------------------------------------------------------------


def test_video_without_pyav_fails_before_the_model_loads(monkeypatch, capsys, tmp_path):
    import sys

    import seg_rt.models

    monkeypatch.setitem(sys.modules, "av", None)  # import av -> ImportError
    monkeypatch.setattr(seg_rt.models, "open_model", lambda *a, **k: pytest.fail("model loaded"))
    rc = main(["video", "--steps", "1", "--no-progress", "--out", str(tmp_path / "v.mp4")])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and err[-1].startswith("seg-rt: error: av is not installed") and "video" in err[-1], err
    assert not list(tmp_path.iterdir())
    from seg_rt.cluster.jobs.spec import parse_job
    from seg_rt.cluster.jobs.worker import SEGWorker

    spec = parse_job({"model": "org/name", "prompts": ["a"], "output": str(tmp_path / "o"), "video": {}})
    with pytest.raises(ImportError, match="av is not installed"):
        SEGWorker(spec.model_dump(mode="json"), "w0")


# ---- the model cache -----------------------------------------------------------------------------


@pytest.fixture
def memory_model():
    """A model folder on fsspec's memory backend: a real backend whose listing has no version
    (no ETag, no modification time), as many HTTP servers give."""
    fsspec = pytest.importorskip("fsspec")
    fs = fsspec.filesystem("memory")
    root = "/seg-rt-test-model"
    fs.pipe(f"{root}/model_index.json", b'{"_class_name": "StableDiffusionPipeline"}')
    fs.pipe(f"{root}/unet/diffusion_pytorch_model.safetensors", b"A" * 64)
    yield fs, root, f"memory://{root}"
    fs.rm(root, recursive=True)


def test_versionless_object_changed_at_the_same_size_is_fetched_again(memory_model, tmp_path):
    from seg_rt.cluster.storage import fetch_model

    fs, root, url = memory_model
    first = fetch_model(url, tmp_path / "cache")
    assert (first / "unet/diffusion_pytorch_model.safetensors").read_bytes() == b"A" * 64
    fs.pipe(f"{root}/unet/diffusion_pytorch_model.safetensors", b"B" * 64)  # same size, new content
    again = fetch_model(url, tmp_path / "cache")
    assert (again / "unet/diffusion_pytorch_model.safetensors").read_bytes() == b"B" * 64
    assert [p.name for p in (tmp_path / "cache").iterdir()] == [again.name]  # no temp or stale copy left
    assert fetch_model(url, tmp_path / "cache") == again  # unchanged: the checked entry is reused


def test_planted_or_damaged_cache_entry_is_refused(memory_model, tmp_path, caplog):
    import logging
    import os

    from seg_rt.cluster.storage import fetch_model

    _, _, url = memory_model
    cache = tmp_path / "cache"
    entry = fetch_model(url, cache)
    weights = entry / "unet/diffusion_pytorch_model.safetensors"
    entry.chmod(0o755)  # a folder someone else could have made and filled
    with pytest.raises(ValueError, match="has mode 0755, not 0700"):
        fetch_model(url, cache)
    entry.chmod(0o700)
    weights.write_bytes(b"planted")
    with pytest.raises(ValueError, match=r"holds unet/diffusion_pytorch_model.safetensors at 7 bytes"):
        fetch_model(url, cache)
    weights.unlink()
    weights.symlink_to(tmp_path / "elsewhere")
    with pytest.raises(ValueError, match="as a link"):
        fetch_model(url, cache)
    assert weights.is_symlink()  # nothing of the entry deleted
    if os.getuid() == 0:  # another owner (only root can make one here)
        weights.unlink()
        weights.write_bytes(b"A" * 64)
        os.chown(entry, 12345, 12345)
        with pytest.raises(ValueError, match="is owned by uid 12345"):
            fetch_model(url, cache)
    shared = tmp_path / "shared"
    shared.mkdir(mode=0o777)
    shared.chmod(0o777)
    with caplog.at_level(logging.WARNING, logger="seg_rt"):
        fetch_model(url, shared)
    assert any("writable by other users" in r.getMessage() for r in caplog.records)


# ---- frames past the motion modules, allocation failures -----------------------------------------


def test_video_frames_past_the_motion_modules_is_one_line(capsys, tmp_path):
    """The demo video model's motion modules hold 16 frames: 17 is refused before sampling."""
    rc = main(["video", "--frames", "17", "--steps", "1", "--no-progress", "--out", str(tmp_path / "v.gif")])
    err = capsys.readouterr().err.strip().splitlines()
    assert (
        rc == 2
        and err[-1]
        == "seg-rt: error: frames must be <= 16 for this model (its motion modules hold 16 frames), got 17"
    ), err
    assert not list(tmp_path.iterdir())


def test_allocation_failure_is_one_line(capsys, monkeypatch, tmp_path):
    """A request too big for the machine: torch's real allocator error, as one line, exit 2."""
    import torch

    import seg_rt.pipeline

    def huge(*a, **k):
        return torch.empty(2**46, dtype=torch.uint8)  # 64 TiB: the CPU allocator refuses it

    monkeypatch.setattr(seg_rt.pipeline, "run_params", huge)
    rc = main(["generate", "--steps", "1", "--no-progress", "--out", str(tmp_path / "o.png")])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and err[-1].startswith("seg-rt: error: out of memory: DefaultCPUAllocator"), err
    assert not list(tmp_path.iterdir())


# ---- a branch-parallel rank that dies ------------------------------------------------------------


def test_dead_branch_parallel_rank_is_one_line_naming_the_signal():
    import os
    import signal

    from seg_rt.demo.model import weights_dir
    from seg_rt.engines.branch import ProcessBranchGroup
    from seg_rt.errors import RankExited
    from seg_rt.execution import BranchParallel
    from seg_rt.params import GenerationParams

    with ProcessBranchGroup(BranchParallel(ranks=2), str(weights_dir()), threads=1) as group:
        procs = list(group._procs)
        os.kill(procs[1].pid, signal.SIGKILL)
        with pytest.raises(RankExited) as exc:
            group.run("images", [GenerationParams(prompt="a", steps=1)], "latent")
    assert str(exc.value).startswith("branch-parallel rank 1 was killed by SIGKILL"), str(exc.value)
    assert "\n" not in str(exc.value) and not any(p.is_alive() for p in procs)
