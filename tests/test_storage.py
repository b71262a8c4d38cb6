"""Job outputs on object storage: a real S3-compatible HTTP server (moto's server mode) on loopback.

The driver speaks HTTP to it through s3fs/botocore exactly as to S3; credentials and the endpoint
come from the environment (AWS_* variables), never from the job spec.
"""

import json
import logging
import os
import re
from pathlib import Path

import pytest

pytest.importorskip("s3fs")
pytest.importorskip("moto.server")

from seg_rt.cluster.jobs.driver import completed, read_manifest, run_job
from seg_rt.cluster.jobs.spec import parse_job
from seg_rt.cluster.storage import MANIFEST_PREFIX, FsspecStore, LocalStore, open_store

from .manifest_rows import ok_row
from .ray_helpers import LOOPBACK, free_port, kill_ray_under, short_temp_dir

SECRET = "segrt-test-secret-" + "9f3c1a"  # must never appear in an object or a log line
BUCKET = "segrt-out"


@pytest.fixture(scope="module")
def s3(tmp_path_factory):
    """A moto S3 server on 127.0.0.1, reached through the usual AWS environment variables (set
    before the module's Ray starts, so its workers see them too, as on a configured node); fetched
    model folders are cached in a temp dir (``SEG_RT_MODEL_CACHE``)."""
    import boto3
    import s3fs
    from moto.server import ThreadedMotoServer

    port = free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    mp = pytest.MonkeyPatch()
    env = {"AWS_ACCESS_KEY_ID": "segrt-test-key", "AWS_SECRET_ACCESS_KEY": SECRET,
           "AWS_DEFAULT_REGION": "us-east-1", "AWS_ENDPOINT_URL_S3": f"http://127.0.0.1:{port}"}  # fmt: skip
    for key, value in env.items():
        mp.setenv(key, value)
    mp.delenv("AWS_PROFILE", raising=False)
    mp.setenv("SEG_RT_MODEL_CACHE", str(tmp_path_factory.mktemp("model-cache")))
    s3fs.S3FileSystem.clear_instance_cache()
    client = boto3.client("s3")
    client.create_bucket(Bucket=BUCKET)
    yield client
    s3fs.S3FileSystem.clear_instance_cache()
    mp.undo()
    server.stop()


def _objects(client, prefix: str) -> dict[str, bytes]:
    keys = [o["Key"] for o in client.list_objects_v2(Bucket=BUCKET, Prefix=prefix).get("Contents", [])]
    return {k[len(prefix) :]: client.get_object(Bucket=BUCKET, Key=k)["Body"].read() for k in keys}


# ---- spec ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("output", "message"),
    [
        ("s3://AKIAKEY:" + SECRET + "@bucket/x", "output URL 's3://***@bucket/x' carries credentials"),
        ("s3://bucket/x?secret=" + SECRET, "carries credentials or query options"),
        ("nosuchfs://bucket/x", "output URL scheme 'nosuchfs' is not an fsspec protocol"),
        ("s3:///x", "output URL 's3:///x' names no bucket"),
    ],
)
def test_output_url_refusals_are_one_line_without_the_secret(output, message):
    with pytest.raises(ValueError, match=re.escape(message)) as err:
        parse_job({"model": "org/name", "prompts": ["a"], "output": output})
    assert len(str(err.value).splitlines()) == 1 and SECRET not in str(err.value)


def test_urls_go_to_fsspec_and_paths_stay_local(tmp_path):
    assert parse_job({"model": "org/name", "prompts": ["a"], "output": "s3://b/p"}).output == "s3://b/p"
    assert isinstance(open_store("s3://b/p"), FsspecStore)
    local = open_store("out", tmp_path)
    assert isinstance(local, LocalStore) and local.root == tmp_path / "out"
    assert open_store("file:///tmp/x").root.as_posix() == "/tmp/x"  # file:// is a local path
    assert isinstance(open_store(str(tmp_path / "abs")), LocalStore)


# ---- store on a real S3 HTTP server ------------------------------------------------------------


def test_object_store_manifest_is_one_object_per_row_and_verifies_bytes(s3, caplog):
    store = open_store(f"s3://{BUCKET}/unit/")
    rows = [ok_row(store, k, f"png {k}".encode()) for k in ("kept", "missing", "changed", "escape")]
    rows[3]["path"] = "../other/images/escape.png"
    manifest = store.open_manifest()
    for row in rows:
        manifest.append(row)
    manifest.append({"item": "bad", "status": "failed", "error": "x"})
    manifest.close()
    s3.put_object(Bucket=BUCKET, Key=f"unit/{MANIFEST_PREFIX}/zz-garbage.json", Body=b'{"torn": ')
    s3.delete_object(Bucket=BUCKET, Key="unit/images/missing.png")
    s3.put_object(Bucket=BUCKET, Key="unit/images/changed.png", Body=b"png chang3")  # same size
    objects = _objects(s3, "unit/")
    names = sorted(k for k in objects if k.startswith(f"{MANIFEST_PREFIX}/"))
    assert len(names) == 6  # five rows, one object each, plus the garbage one
    assert [json.loads(objects[n])["item"] for n in names[:5]] == [
        "kept",
        "missing",
        "changed",
        "escape",
        "bad",
    ]
    assert store.read("images/kept.png") == b"png kept" and store.exists("images/kept.png")
    with caplog.at_level(logging.WARNING):
        assert [r["item"] for r in read_manifest(store)] == ["kept", "missing", "changed", "escape", "bad"]
        assert completed(f"s3://{BUCKET}/unit") == {"kept"}
    assert any("skipped 1 unreadable" in r.getMessage() for r in caplog.records)
    assert read_manifest(f"s3://{BUCKET}/nothing-here") == []


def test_second_driver_never_overwrites_the_firsts_rows(s3):
    """Two writers (a resumed run, or two drivers by mistake) name their row objects apart."""
    store = open_store(f"s3://{BUCKET}/two")
    first, second = store.open_manifest(), store.open_manifest()
    first.append({"item": "a", "status": "failed"})
    second.append({"item": "b", "status": "failed"})
    assert sorted(r["item"] for r in store.read_manifest()) == ["a", "b"]


# ---- a job on Ray writing to the S3 server ---------------------------------------------------


@pytest.fixture(scope="module")
def local_ray():
    """A private local Ray with token auth, as seg-rt starts one. Ray caches its auth config per
    process, so it is re-read from the environment on the way in and out (an earlier test may have
    left it stale)."""
    import ray

    from seg_rt.cluster.jobs.driver import refresh_ray_auth

    mp = pytest.MonkeyPatch()
    mp.setenv("RAY_AUTH_MODE", "token")
    mp.setenv("RAY_AUTH_TOKEN", "segrt-test-" + os.urandom(8).hex())
    refresh_ray_auth()
    temp = short_temp_dir()
    try:
        ray.init(
            num_cpus=2,
            _temp_dir=temp,
            _node_ip_address=LOOPBACK,
            include_dashboard=False,
            log_to_driver=False,
        )
        yield ray
    finally:
        ray.shutdown()
        kill_ray_under(temp)
        mp.undo()
        refresh_ray_auth()


def _job(model, output, **over) -> dict:
    base = {"model": str(model), "seg": {"scale": 3.0, "sigma": 2.0}, "cfg": 4.0, "steps": 2, "height": 64,
            "width": 64, "prompts": ["a cat", "a dog"], "samples_per_prompt": 2, "seed": 11, "workers": 2,
            "output": str(output), "contact_sheet": True}  # fmt: skip
    return {**base, **over}


@pytest.mark.slow
def test_job_to_s3_same_bytes_as_local_and_resumes_from_the_manifest_in_storage(
    s3, local_ray, sdxl_dir, tmp_path, caplog
):
    url = f"s3://{BUCKET}/job"
    with caplog.at_level(logging.DEBUG, logger="seg_rt"):
        remote = run_job(parse_job(_job(sdxl_dir, url)), tmp_path, progress=False)
    local = run_job(parse_job(_job(sdxl_dir, tmp_path / "local", workers=1)), tmp_path, progress=False)
    assert remote.ok and local.ok and remote.done == local.done == 4
    objects = _objects(s3, "job/")
    on_disk = {
        p.relative_to(tmp_path / "local").as_posix(): p.read_bytes()
        for p in (tmp_path / "local").rglob("*.png")
    }
    assert {k: v for k, v in objects.items() if k.endswith(".png")} == on_disk  # images + contact sheets
    assert {"contact/p00000.png", "contact/p00001.png"} <= set(on_disk)
    rows = [json.loads(v) for k, v in objects.items() if k.startswith(f"{MANIFEST_PREFIX}/")]
    assert sorted(r["item"] for r in rows) == sorted(completed(tmp_path / "local"))
    everything = b"".join(objects.values()).decode(errors="replace") + caplog.text
    assert SECRET not in everything and "segrt-test-key" not in everything

    # resume reads the manifest from storage: a row lost (driver died between PUTs) and an image
    # lost are the two items redone; the two intact ones are skipped
    row_key = next(k for k, v in objects.items() if k.startswith(MANIFEST_PREFIX) and b"p00000_s001" in v)
    s3.delete_object(Bucket=BUCKET, Key=f"job/{row_key}")
    s3.delete_object(Bucket=BUCKET, Key="job/images/p00001_s000.png")
    again = run_job(parse_job(_job(sdxl_dir, url)), tmp_path, progress=False)
    assert (again.skipped, again.done) == (2, 2)
    after = _objects(s3, "job/")
    assert {k: v for k, v in after.items() if k.endswith(".png")} == on_disk
    ok = [r["item"] for r in read_manifest(url) if r["status"] == "ok"]
    assert sorted(set(ok)) == sorted(
        on_disk_item[7:-4] for on_disk_item in on_disk if on_disk_item.startswith("images/")
    )
    assert completed(url) == completed(tmp_path / "local")


def _upload(client, folder, prefix: str) -> None:
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        client.put_object(
            Bucket=BUCKET, Key=f"{prefix}/{path.relative_to(folder).as_posix()}", Body=path.read_bytes()
        )


def test_model_url_is_fetched_once_keyed_by_its_listing_and_safetensors_only(s3, tmp_path, caplog):
    from seg_rt.cluster.storage import fetch_model, resolve_model
    from seg_rt.tiny import save_tiny_pipeline

    folder = save_tiny_pipeline("sd15", tmp_path / "sd15")
    _upload(s3, folder, "models/sd15")
    cache = tmp_path / "cache"
    url = f"s3://{BUCKET}/models/sd15"
    with caplog.at_level(logging.INFO, logger="seg_rt"):
        first = fetch_model(url, cache)
        again = fetch_model(url + "/", cache)
    assert first == again and [p.name for p in cache.iterdir()] == [first.name]  # no temp dir left
    assert sum("fetched" in r.getMessage() for r in caplog.records) == 1  # the second call reused it
    local = {p.relative_to(folder).as_posix(): p.read_bytes() for p in folder.rglob("*") if p.is_file()}
    fetched = {p.relative_to(first).as_posix(): p.read_bytes() for p in first.rglob("*") if p.is_file()}
    assert fetched == local
    assert resolve_model("org/name") == "org/name" and resolve_model(str(folder)) == str(folder)

    # a changed object (new ETag) is a new cache entry; the old one is left for its readers
    s3.put_object(
        Bucket=BUCKET,
        Key="models/sd15/model_index.json",
        Body=(folder / "model_index.json").read_bytes() + b" ",
    )
    changed = fetch_model(url, cache)
    assert changed != first and (changed / "model_index.json").read_bytes().endswith(b" ")

    # pickle weights are refused before any byte is fetched
    _upload(s3, folder, "models/pickled")
    s3.put_object(Bucket=BUCKET, Key="models/pickled/unet/diffusion_pytorch_model.bin", Body=b"not read")
    with pytest.raises(ValueError, match=r"holds pickle-format files \(unet/diffusion_pytorch_model.bin\)"):
        fetch_model(f"s3://{BUCKET}/models/pickled", cache)
    assert len(list(cache.iterdir())) == 2
    with pytest.raises(FileNotFoundError, match="holds no files"):
        fetch_model(f"s3://{BUCKET}/models/none", cache)


def test_model_url_with_credentials_is_refused_in_one_line():
    with pytest.raises(ValueError) as err:
        parse_job(_job(f"s3://key:{SECRET}@{BUCKET}/models/sd15", "out"))
    assert "model URL 's3://***@segrt-out/models/sd15' carries credentials" in str(err.value)
    assert SECRET not in str(err.value)


@pytest.mark.slow
def test_video_job_from_a_model_url_to_s3_equals_the_local_run(s3, local_ray, tmp_path):
    """Workers fetch the model from S3 (once per node, cached), the driver PUTs the mp4s and the
    manifest rows to S3; the videos are the bytes an in-process worker makes from the local folder."""
    from seg_rt.cluster.jobs.spec import expand_items
    from seg_rt.cluster.jobs.worker import SEGWorker
    from seg_rt.tiny import save_tiny_video_pipeline

    folder = save_tiny_video_pipeline("animatediff", tmp_path / "vid")
    _upload(s3, folder, "models/vid")
    video = {"frames": 3, "fps": 6, "mode": "spatiotemporal", "sigma_time": 1.0}
    over = {"video": video, "height": 32, "width": 48, "contact_sheet": False}
    spec = parse_job(_job(f"s3://{BUCKET}/models/vid", f"s3://{BUCKET}/videojob", **over))
    result = run_job(spec, tmp_path, progress=False)
    assert result.ok and result.done == 4
    objects = _objects(s3, "videojob/")
    videos = {k[len("videos/") : -len(".mp4")]: v for k, v in objects.items() if k.startswith("videos/")}
    rows = [json.loads(v) for k, v in objects.items() if k.startswith(f"{MANIFEST_PREFIX}/")]
    assert sorted(r["item"] for r in rows if r["status"] == "ok") == sorted(videos)
    local_spec = parse_job(_job(folder, tmp_path / "unused", **over))
    worker_rows = SEGWorker(local_spec.model_dump(mode="json"), "ref").run(expand_items(local_spec, tmp_path))
    assert all("mp4" in r for r in worker_rows), worker_rows
    reference = {r["item"]: r["mp4"] for r in worker_rows}
    assert videos == reference
    assert len(list(Path(os.environ["SEG_RT_MODEL_CACHE"]).iterdir())) == 1  # one fetch for both workers
