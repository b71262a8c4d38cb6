"""Batch jobs over a local Ray: determinism across workers / micro-batches, faults, resume, submit."""

import hashlib
import json
import math
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from seg_rt.cluster.jobs.driver import completed, read_manifest, refresh_ray_auth, run_job
from seg_rt.cluster.jobs.spec import expand_items, item_seed, load_job, parse_job
from seg_rt.cluster.jobs.worker import SEGWorker
from seg_rt.demo.model import weights_dir
from seg_rt.params import GenerationParams, VideoParams

from . import fault_injection
from .fault_injection import FAULT_AFTER_ENV, FAULT_FILE_ENV, CrashOnceWorker
from .golden import GOLDEN, fingerprint, png_pixels
from .ray_helpers import LOOPBACK, free_port, kill_ray_under, short_temp_dir
from .sockets import listening, not_on_loopback, tree

BIN = Path(sys.executable).parent


def job(model, output, **over):
    base = {"model": str(model), "seg": {"scale": 3.0, "sigma": 2.0}, "cfg": 4.0, "steps": 2, "height": 64,
            "width": 64, "prompts": ["a cat", "a dog"], "samples_per_prompt": 2, "seed": 11, "batch_size": 1,
            "workers": 1, "output": str(output)}  # fmt: skip
    return {**base, **over}


def write_job(path: Path, data: dict) -> Path:
    path.write_text(yaml.safe_dump(data))
    return path


def outputs(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted((folder / "images").glob("*.png"))}


# ---- spec (no Ray) ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ({"seg": {"sigma": -1}}, "job: seg: seg sigma must be > 0 or inf, got -1"),
        ({"cfg": 0.5}, "job: cfg: cfg must be a finite number >= 1"),
        (
            {"cfg": math.inf},
            "job: cfg: cfg must be a finite number >= 1 (1 disables classifier-free guidance), got inf",
        ),
        ({"seed": 2**64}, "job: seed: seed must be an integer from 0 to 2**64 - 1, got 18446744073709551616"),
        (
            {"video": {"mode": "temporal", "sigma_time": 0}},
            "job: video: seg mode 'temporal' with seg sigma time 0",
        ),
        (
            {"video": {"mode": "sideways"}},
            "job: video.mode: seg mode must be one of spatial, temporal, spatiotemporal, got 'sideways'",
        ),
        ({"guidance_rescale": 2}, "job: guidance_rescale: guidance rescale must be in [0, 1], got 2"),
        ({"steps": 0}, "job: steps: steps must be an integer >= 1, got 0"),
        ({"video": {}, "seg": {"layers": ["up"]}}, "job: seg layers 'up' select image UNet blocks"),
        ({"colour": "red"}, "job: colour: Extra inputs are not permitted"),
        ({"prompts_file": "p.txt"}, "give exactly one of prompts (a list) or prompts_file"),
        (
            {"engine": "magic"},
            "job: engine: engine must be one of torch, torch-compile, onnx:DIR, trt:DIR, got 'magic'",
        ),
        ({"scheduler": "zzz"}, "job: scheduler: scheduler must be one of euler, euler_a"),
        ({"resources_per_worker": {"num_gpus": -1}}, "job: resources_per_worker.num_gpus"),
    ],
)
def test_spec_errors_name_the_field(tmp_path, override, message):
    with pytest.raises(ValueError, match=re.escape(message)) as err:
        parse_job(job(tmp_path, tmp_path / "o", **override))
    assert len(str(err.value).splitlines()) == 1


def test_spec_defaults_are_the_request_types():
    """A job that says nothing gets GenerationParams' / VideoParams' defaults (also for videos)."""
    spec = parse_job({"model": "org/name", "prompts": ["a"], "output": "o", "video": {}})
    assert spec.base_params() == GenerationParams(video=VideoParams())
    assert spec.video.params() == VideoParams()  # spatiotemporal, sigma_time 1, 16 frames, 8 fps
    image = parse_job({"model": "org/name", "prompts": ["a"], "output": "o"})
    assert image.base_params() == GenerationParams() and image.seed == GenerationParams().seed


def test_size_follows_the_models_own_scale_factor(sdxl_dir, tmp_path):
    with pytest.raises(ValueError, match=re.escape("job: height must be a positive multiple of 8, got 65")):
        parse_job(job(sdxl_dir, tmp_path / "o", height=65))
    # the pixel-space demo model (scale factor 1) takes sizes the old hard-coded multiple of 8 refused
    spec = parse_job(job(weights_dir(), tmp_path / "o", height=36, width=20))
    assert (spec.height, spec.width) == (36, 20)
    assert parse_job(job("org/name", tmp_path / "o", height=36)).height == 36  # hub id: checked at load


def test_relative_model_and_engine_resolve_against_the_job_folder(sdxl_dir, tmp_path, monkeypatch):
    folder = tmp_path / "jobs"
    (folder / "models").mkdir(parents=True)
    (folder / "models" / "tiny").symlink_to(sdxl_dir, target_is_directory=True)
    monkeypatch.chdir(tmp_path)  # the cwd is not the job folder
    path = write_job(folder / "job.yaml", job("models/tiny", "o", engine="onnx:engines/e"))
    spec, base = load_job(path)
    assert base == folder.resolve() and Path(spec.model) == (folder / "models" / "tiny").resolve()
    assert spec.engine == f"onnx:{(folder / 'engines' / 'e').resolve()}"
    hub = write_job(folder / "hub.yaml", job("org/name", "o"))
    assert load_job(hub)[0].model == "org/name"  # not an existing path: a hub id
    dotted = write_job(folder / "dot.yaml", job("./missing", "o"))
    assert load_job(dotted)[0].model == str((folder / "missing").resolve())


def test_job_file_errors(tmp_path):
    (tmp_path / "bad.yaml").write_text("model: [unclosed")
    with pytest.raises(ValueError, match="not valid YAML"):
        load_job(tmp_path / "bad.yaml")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_job(tmp_path / "missing.yaml")


def test_item_seeds_depend_only_on_job_seed_and_indices(tmp_path):
    a = expand_items(parse_job(job(tmp_path, "o", samples_per_prompt=2)), tmp_path)
    b = expand_items(parse_job(job(tmp_path, "o", samples_per_prompt=5, workers=4, batch_size=3)), tmp_path)
    assert [i.seed for i in a] == [i.seed for i in b if i.sample_index < 2]
    assert a[0].seed == item_seed(11, 0, 0) and len({i.seed for i in b}) == len(b)


def test_prompt_files_and_jsonl_overrides(tmp_path):
    (tmp_path / "p.txt").write_text("one\n\ntwo\n")
    spec = parse_job(job(tmp_path, "o", prompts=None, prompts_file="p.txt"))
    assert [i.prompt for i in expand_items(spec, tmp_path)] == ["one", "one", "two", "two"]
    (tmp_path / "p.jsonl").write_text(
        '{"prompt": "x", "seed": 5, "cfg": 2, "seg": {"sigma": "inf"}}\n{"prompt": "y"}\n'
    )
    items = expand_items(parse_job(job(tmp_path, "o", prompts=None, prompts_file="p.jsonl")), tmp_path)
    assert [(i.seed, i.params.cfg) for i in items[:2]] == [(5, 2.0), (6, 2.0)]
    assert math.isinf(items[0].params.seg.sigma) and items[0].params.to_record()["seg_sigma"] == "inf"
    assert items[2].params.cfg == 4.0 and items[2].params.seg.sigma == 2.0
    # one request type: the item's record is the CLI's (flat seg_* keys), the same for every item
    assert GenerationParams.from_record(items[2].params.to_record()) == items[2].params
    for text, message in [
        ('{"prompt": "x", "cfg": 0}', r"bad.jsonl:1: cfg"),
        ('{"prompt": "x", "cfg": Infinity}', r"bad.jsonl:1: cfg: cfg must be a finite number"),
        (
            '{"prompt": "x", "seed": 18446744073709551616}',
            r"bad.jsonl:1: seed: seed must be an integer from 0",
        ),
    ]:
        (tmp_path / "bad.jsonl").write_text(text + "\n")
        with pytest.raises(ValueError, match=message):
            expand_items(parse_job(job(tmp_path, "o", prompts=None, prompts_file="bad.jsonl")), tmp_path)
    # seed + sample index past 2**64 - 1: refused before Ray, naming the prompt
    (tmp_path / "edge.jsonl").write_text('{"prompt": "x", "seed": 18446744073709551615}\n')
    with pytest.raises(ValueError, match=r"prompt 0 \('x'\), sample 1: seed must be an integer"):
        expand_items(parse_job(job(tmp_path, "o", prompts=None, prompts_file="edge.jsonl")), tmp_path)


def test_fused_batches_are_runs_of_equal_batch_keys_in_item_order(tmp_path):
    """``batch_mode: fused`` puts consecutive items with equal ``batch_key()`` into one sampling run;
    an equal key after a different one starts a new run (items stay in order)."""
    (tmp_path / "p.jsonl").write_text(
        '{"prompt": "a", "cfg": 2}\n{"prompt": "b", "cfg": 2}\n{"prompt": "c", "cfg": 3}\n{"prompt": "d", "cfg": 2}\n'
    )
    items = expand_items(parse_job(job(tmp_path, "o", prompts=None, prompts_file="p.jsonl")), tmp_path)
    assert [(i.prompt, i.params.cfg) for i in items][::2] == [("a", 2.0), ("b", 2.0), ("c", 3.0), ("d", 2.0)]
    fused = [[i.id for i in g] for g in SEGWorker._groups(items, fused=True)]
    ids = [i.id for i in items]  # two samples per prompt
    assert fused == [ids[0:4], ids[4:6], ids[6:8]]
    assert [[i.id for i in g] for g in SEGWorker._groups(items, fused=False)] == [[i] for i in ids]


# ---- local Ray -------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def local_ray():
    import ray

    refresh_ray_auth()  # Ray caches auth settings per process: read this test's environment
    temp = short_temp_dir()
    ray.init(
        num_cpus=2, _temp_dir=temp, _node_ip_address=LOOPBACK, include_dashboard=False, log_to_driver=False
    )
    yield ray
    ray.shutdown()
    kill_ray_under(temp)


pytestmark_ray = pytest.mark.slow


@pytestmark_ray
def test_same_bytes_for_any_worker_count_and_micro_batch(local_ray, sdxl_dir, tmp_path):
    runs = {}
    for workers, batch, mode in [(1, 1, "item"), (2, 2, "item"), (2, 1, "item"), (1, 3, "fused")]:
        out = tmp_path / f"w{workers}b{batch}"
        spec = parse_job(
            job(sdxl_dir, out, workers=workers, batch_size=batch, contact_sheet=True, batch_mode=mode)
        )
        result = run_job(spec, tmp_path, progress=False)
        assert result.ok and result.done == 4
        runs[(workers, batch)] = outputs(out)
        if workers == 2:
            assert len(result.per_worker) == 2  # both workers got work
    assert len(runs[(1, 1)]) == 4
    assert runs[(1, 1)] == runs[(2, 2)] == runs[(2, 1)] == runs[(1, 3)]  # fused batches too
    golden = json.loads(GOLDEN.read_text())
    if golden["fingerprint"] == fingerprint():  # the pixels the job wrote before the consolidation
        got = {
            name: hashlib.sha256(png_pixels(data).tobytes()).hexdigest()
            for name, data in runs[(2, 2)].items()
        }
        assert got == golden["job_pixels"]["images"]
    assert (tmp_path / "w2b2" / "contact" / "p00000.png").is_file()


@pytestmark_ray
def test_killed_worker_is_replaced_and_every_item_lands_once(local_ray, sdxl_dir, tmp_path, monkeypatch):
    import ray.cloudpickle

    from seg_rt.cluster.jobs import driver

    # the driver's actors run the test-only worker that kills its process once (shipped by value:
    # Ray's workers need not import the tests package)
    ray.cloudpickle.register_pickle_by_value(fault_injection)
    monkeypatch.setattr(driver, "SEGWorker", CrashOnceWorker)
    out = tmp_path / "out"
    marker = tmp_path / "crashed"
    spec = parse_job(job(sdxl_dir, out, workers=2, samples_per_prompt=3))
    env = {"env_vars": {FAULT_FILE_ENV: str(marker), FAULT_AFTER_ENV: "2"}}
    result = run_job(spec, tmp_path, progress=False, runtime_env=env)
    assert marker.exists() and result.restarts >= 1
    assert result.ok and result.done == 6
    ok = [r["item"] for r in read_manifest(out) if r["status"] == "ok"]
    assert sorted(ok) == sorted(set(ok)) and len(ok) == 6


@pytestmark_ray
def test_item_that_keeps_failing_is_recorded_and_the_rest_finish(local_ray, sdxl_dir, tmp_path):
    (tmp_path / "p.jsonl").write_text(
        '{"prompt": "fine"}\n{"prompt": "broken", "seg": {"layers": ["nowhere"]}}\n'
    )
    spec = parse_job(job(sdxl_dir, tmp_path / "out", prompts=None, prompts_file="p.jsonl", samples_per_prompt=1,
                         max_attempts=2))  # fmt: skip
    result = run_job(spec, tmp_path, progress=False)
    assert result.failed == ["p00001_s000"] and result.done == 1
    failed = [r for r in read_manifest(tmp_path / "out") if r["status"] == "failed"]
    assert failed[0]["item"] == "p00001_s000" and "matches no self-attention layer" in failed[0]["error"]


@pytest.mark.slow
def test_killed_driver_resumes_without_duplicates(sdxl_dir, tmp_path):
    """A driver SIGKILLed mid-job and rerun: every item present exactly once, same bytes. The job is
    an inpainting job (init image and mask relative to its folder), so the resume covers the tasks:
    an item the rerun computed equals the same item computed alone in-process."""
    import numpy as np
    import torch
    from PIL import Image

    rng = np.random.RandomState(0)
    Image.fromarray((rng.rand(64, 64, 3) * 255).astype(np.uint8)).save(tmp_path / "init.png")
    mask = np.zeros((64, 64), np.uint8)
    mask[16:48, 8:40] = 255
    Image.fromarray(mask).save(tmp_path / "mask.png")
    out = tmp_path / "out"
    data = job(
        sdxl_dir, out, samples_per_prompt=4, steps=3, init_image="init.png", mask="mask.png", strength=0.7
    )
    path = write_job(tmp_path / "job.yaml", data)
    temp = short_temp_dir()
    cmd = [str(BIN / "seg-rt"), "run", str(path), "--no-progress", "--ray-temp-dir", temp]
    try:
        proc = subprocess.Popen(
            cmd, start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
        )
        deadline = time.monotonic() + 180
        while len(completed(out)) < 2 and time.monotonic() < deadline and proc.poll() is None:
            time.sleep(0.1)
        assert proc.poll() is None, "driver finished before it could be killed"
        # docs/security.md (#27 item 2): what `seg-rt run`'s own Ray (gcs_server, raylet, agents,
        # the job's workers) and its driver listen on, listed from the OS mid-job: loopback only
        pids = [p.pid for p in tree(proc.pid)]
        names = " ".join(s[1] for s in listening(pids))
        assert "gcs_server" in names and "raylet" in names and "SEGWorker" in names, names
        assert not_on_loopback(pids) == []
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    finally:
        kill_ray_under(temp)
    partial = len(completed(out))
    assert 2 <= partial < 8
    temp2 = short_temp_dir()
    try:
        r = subprocess.run([*cmd[:-1], temp2, "--json"], capture_output=True, text=True, timeout=300)
    finally:
        kill_ray_under(temp2)
    assert r.returncode == 0, r.stderr
    summary = json.loads(r.stdout.strip().splitlines()[-1])
    assert summary["skipped"] == partial and summary["done"] == 8 - partial
    ok = [row["item"] for row in read_manifest(out) if row["status"] == "ok"]
    assert len(ok) == len(set(ok)) == 8 and len(outputs(out)) == 8
    # the last item (computed by the rerun) equals the same item alone, one thread as the job's worker
    spec = parse_job(data)
    item = expand_items(spec, tmp_path)[-1]
    assert item.params.task == "inpaint"
    threads = torch.get_num_threads()
    try:
        worker = SEGWorker(spec.model_dump(mode="json"), "solo")
        solo = worker.run([item])[0]["png"]
        worker.close()
    finally:
        torch.set_num_threads(threads)
    assert outputs(out)[f"{item.id}.png"] == solo


@pytest.mark.slow
def test_submit_to_a_head_this_test_starts(sdxl_dir, tmp_path):
    """`seg-rt submit --follow` against `ray start --head` on loopback with token auth."""
    temp = short_temp_dir()
    port, dash = free_port(), free_port()
    env = {**os.environ, "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": "segrt-test-" + os.urandom(8).hex(),
           "PATH": f"{BIN}:{os.environ['PATH']}"}  # fmt: skip
    start = [str(BIN / "ray"), "start", "--head", "--node-ip-address", LOOPBACK, "--port", str(port),
             "--dashboard-host", "127.0.0.1", "--dashboard-port", str(dash), "--include-dashboard", "true",
             "--num-cpus", "2", "--temp-dir", temp, "--disable-usage-stats"]  # fmt: skip
    # every fixed default port gets a free one: a head killed moments earlier leaves them in TIME_WAIT
    for flag in ("--dashboard-agent-listen-port", "--dashboard-agent-grpc-port", "--metrics-export-port",
                 "--runtime-env-agent-port", "--node-manager-port", "--object-manager-port",
                 "--ray-client-server-port"):  # fmt: skip
        start += [flag, str(free_port())]
    try:
        subprocess.run(start, env=env, check=True, capture_output=True, timeout=120)
        path = write_job(tmp_path / "job.yaml", job(sdxl_dir, tmp_path / "out", samples_per_prompt=1))
        r = subprocess.run([str(BIN / "seg-rt"), "submit", str(path), "--address", f"http://127.0.0.1:{dash}", "--follow"],
                           env=env, capture_output=True, text=True, timeout=400)  # fmt: skip
        assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
        assert r.stdout.strip().splitlines()[-1].endswith("SUCCEEDED")
        assert len(outputs(tmp_path / "out")) == 2
        bad = {**env, "RAY_AUTH_TOKEN": "wrong-token"}
        r = subprocess.run([str(BIN / "seg-rt"), "submit", str(path), "--address", f"http://127.0.0.1:{dash}"],
                           env=bad, capture_output=True, text=True, timeout=120)  # fmt: skip
        assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1, r.stderr
        assert "auth token" in r.stderr or "refused" in r.stderr
    finally:
        kill_ray_under(temp)


@pytestmark_ray
def test_video_jobs_are_deterministic_and_resumable(local_ray, tmp_path):
    """A job spec asking for videos: mp4 per item, same bytes for 1 vs 2 workers, resume skips."""
    import av

    from seg_rt.tiny import save_tiny_video_pipeline

    model = save_tiny_video_pipeline("animatediff", tmp_path / "vid")
    video = {"frames": 3, "fps": 6, "mode": "spatiotemporal", "sigma_time": 1.0}
    runs = {}
    for workers in (1, 2):
        out = tmp_path / f"v{workers}"
        spec = parse_job(job(model, out, workers=workers, video=video, height=32, width=48))
        result = run_job(spec, tmp_path, progress=False)
        assert result.ok and result.done == 4
        runs[workers] = {p.name: p.read_bytes() for p in sorted((out / "videos").glob("*.mp4"))}
    assert len(runs[1]) == 4 and runs[1] == runs[2]
    with av.open(str(tmp_path / "v1" / "videos" / "p00000_s000.mp4")) as c:
        assert len(list(c.decode(video=0))) == 3
    again = run_job(
        parse_job(job(model, tmp_path / "v1", video=video, height=32, width=48)), tmp_path, progress=False
    )
    assert again.skipped == 4 and again.done == 0


@pytest.mark.slow
def test_run_gives_up_on_impossible_resources_and_reports_a_model_that_will_not_load(sdxl_dir, tmp_path):
    """num_gpus: 1 on a GPU-less machine → one line and exit 2 at once, not a hang (docs/security.md);
    a model folder that fails to load on the worker → one line naming the error, no traceback."""
    import torch

    if torch.cuda.is_available():
        pytest.skip("needs a machine without a GPU for an impossible resource request")
    cases = [
        (  # refused at once (well before the 250 s start timeout): the local cluster has no autoscaler
            job(sdxl_dir, tmp_path / "o1", resources_per_worker={"num_gpus": 1}),
            250,
            "num_gpus=1 and no node of the local cluster has that much (CPU=",
        ),
        (
            job(tmp_path / "broken", tmp_path / "o2"),
            200,
            "worker w0 could not load the model: ModelLoadError: ",
        ),
    ]
    (tmp_path / "broken").mkdir()
    (tmp_path / "broken" / "model_index.json").write_text('{"_class_name": "StableDiffusionPipeline"}')
    for k, (data, timeout, message) in enumerate(cases):
        path = write_job(tmp_path / f"job{k}.yaml", data)
        temp = short_temp_dir()
        try:
            r = subprocess.run(
                [str(BIN / "seg-rt"), "run", str(path), "--no-progress", "--ray-temp-dir", temp,
                 "--start-timeout", str(timeout)],
                capture_output=True, text=True, timeout=300,
            )  # fmt: skip
        finally:
            kill_ray_under(temp)
        err = [ln for ln in r.stderr.strip().splitlines() if ln.startswith("seg-rt: error")]
        assert r.returncode == 2, r.stderr[-3000:]
        assert len(err) == 1 and message in err[0], r.stderr[-3000:]
        assert "Traceback" not in r.stderr
        assert not (tmp_path / f"o{k + 1}" / "manifest.jsonl").exists()
