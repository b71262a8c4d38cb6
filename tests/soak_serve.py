"""Soak test of ``seg-rt serve``: a tiny model on loopback under concurrent valid and invalid requests.

    python -m tests.soak_serve --seconds 120 --clients 8

Starts ``seg-rt serve`` (its own local Ray under a private temp dir, an API key), then ``clients``
threads send, until the time is up, a random mix of valid requests and invalid ones (oversized
bodies with and without Content-Length, bad fields, NaN / inf, extreme sizes and aspect ratios,
wrong or missing key). Checks: every valid request is 200 and its pixels equal the same request
generated alone in this process (``seg_rt.generate``, 1 thread like the replica) and its record
names the model, not a path; every invalid one gets its own 4xx and message; no 5xx; the server's
resident memory (all its processes) stays bounded. Mixed in (#27): the client APIs' routes
(``ROUTE_VALID`` / ``ROUTE_INVALID``): OpenAI ``/v1/images/generations`` and ``/v1/images/edits``
(multipart, an init image and an alpha mask), A1111 ``/sdapi/v1/txt2img`` and ``/sdapi/v1/img2img``
(base64 ``init_images``, ``mask``; HTTP Basic auth) and img2img / inpainting ``/v1/generate`` bodies,
each valid one compared with its solo run (``seg_rt.generate`` with the same arguments, written out
next to it), each invalid one in its API's error shape. Prints one JSON summary (status counts in all
and per route); exit 1 if a check fails.

    python -m tests.soak_serve --jobs --seconds 120 --clients 8

The job API's soak (``soak_jobs``) on the bundled demo model: ``clients`` threads mix blocking
requests, jobs submitted and polled to the end, jobs cancelled at a random moment, listings, and
invalid jobs (each its own 4xx and message). The bodies: text-to-image ones (``JOB_BODIES``) and
image jobs (``IMAGE_JOBS``: the img2img and inpainting bodies above, base64 init image and mask).
Checks: no 5xx; no lost job (every job submitted ends ``succeeded`` or ``cancelled``, a cancelled
one has no result, and each is still listed until fetched); every succeeded job's and every
blocking answer's bytes equal the same body's solo run (sent alone before the clients start, its
pixels equal to ``seg_rt.generate`` in this process); the server's memory and its state folder
(``jobs.max_bytes``: pruned) stay bounded. ``--in-process`` serves the app with uvicorn in this
process (no Ray: the short version the test suite runs).
"""

import argparse
import base64
import contextlib
import http.client
import io
import json
import os
import random
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from collections import Counter
from pathlib import Path

import numpy as np
import psutil
from PIL import Image

from .ray_helpers import free_port, kill_ray_under, short_temp_dir

SIZE = 64
VALID = [
    {"prompt": "a cat", "seed": 1, "steps": 2},
    {"prompt": "a dog", "seed": 2, "steps": 2},
    {"prompt": "a red cube", "seed": 3, "steps": 2, "seg_sigma": 2},
    {"prompt": "a cat", "seed": 4, "steps": 3, "height": 64, "width": 96},
    {"prompt": "two", "seed": 5, "steps": 2, "num_images": 2, "response": "json"},
    {"prompt": "", "seed": 6, "steps": 2, "cfg": 1, "negative_prompt": "blur"},
]
# (name, raw body or dict, headers override, expected status, expected message part)
BIG = "x" * 1_100_000
INVALID = [
    ("oversized", {"prompt": BIG}, None, 413, "request body must be <="),
    ("oversized-chunked", {"prompt": BIG}, "chunked", 413, "request body must be <="),
    ("bad-type", {"steps": "many"}, None, 422, "steps: Input should be a valid integer"),
    ("extra-field", {"colour": "red"}, None, 422, "colour: Extra inputs are not permitted"),
    ("nan-cfg", '{"prompt": "a", "cfg": NaN}', None, 422, "cfg must be a finite number >= 1"),
    (
        "inf-seg-scale",
        '{"prompt": "a", "seg_scale": Infinity}',
        None,
        422,
        "seg scale must be a finite number",
    ),
    ("nan-sigma", '{"seg_sigma": NaN}', None, 422, "seg sigma must be > 0 or inf"),
    ("aspect", {"height": 8, "width": 128, "steps": 2}, None, 422, "aspect ratio must be at most 4:1"),
    ("huge-side", {"height": 64, "width": 131072, "steps": 2}, None, 422, "height and width must be <= 256"),
    ("not-multiple", {"height": 60, "steps": 2}, None, 422, "height must be a positive multiple of 8"),
    ("seed", {"seed": 2**64}, None, 422, "seed must be an integer from 0 to 2**64 - 1"),
    ("layers", {"steps": 2, "seg_layers": ["nowhere"]}, None, 422, "matches no self-attention layer"),
    ("steps", {"steps": 500}, None, 422, "steps must be <= 50, got 500"),
    ("wrong-key", {"steps": 2}, "wrong-key", 401, "missing or wrong API key"),
    ("no-key", {"steps": 2}, "no-key", 401, "missing or wrong API key"),
]


# ---- the client APIs' routes (#27): OpenAI, A1111, img2img / inpainting on /v1/generate ---------


class Form:
    """A multipart/form-data body (the OpenAI edit route's, as ``openai`` sends it): text fields, files."""

    def __init__(self, fields: dict[str, str], files: dict[str, bytes]) -> None:
        self.fields, self.files = fields, files

    def encoded(self) -> tuple[str, bytes]:
        b = secrets.token_hex(16)
        parts = [
            f'--{b}\r\nContent-Disposition: form-data; name="{k}"\r\n\r\n{v}\r\n'.encode()
            for k, v in self.fields.items()
        ]
        for k, data in self.files.items():
            head = f'--{b}\r\nContent-Disposition: form-data; name="{k}"; filename="{k}.png"\r\n'
            parts.append(f"{head}Content-Type: image/png\r\n\r\n".encode() + data + b"\r\n")
        return f"multipart/form-data; boundary={b}", b"".join(parts) + f"--{b}--\r\n".encode()


def png_bytes(image: Image.Image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, "PNG")
    return buf.getvalue()


INIT = Image.fromarray(np.random.default_rng(0).integers(0, 256, (SIZE, SIZE, 3), dtype=np.uint8))
_WHITE = np.zeros((SIZE, SIZE), bool)
_WHITE[16:48, 8:40] = True
MASK = Image.fromarray(np.where(_WHITE, 255, 0).astype(np.uint8))  # white = repaint (seg-rt, web UI)
# OpenAI's edit mask: fully transparent pixels mark the region to edit (the conversion written out here)
OPENAI_MASK = Image.fromarray(
    np.dstack([np.asarray(INIT), np.where(_WHITE, 0, 255).astype(np.uint8)]), "RGBA"
)
INIT_PNG, MASK_PNG, OPENAI_MASK_PNG = png_bytes(INIT), png_bytes(MASK), png_bytes(OPENAI_MASK)
INIT_B64, MASK_B64 = base64.b64encode(INIT_PNG).decode(), base64.b64encode(MASK_PNG).decode()
HALF_MASK_B64 = base64.b64encode(png_bytes(MASK.crop((0, 0, SIZE, SIZE // 2)))).decode()
# (route, body, the same request's ``seg_rt.generate`` arguments: its solo run)
ROUTE_VALID = [
    (
        "/v1/images/generations",
        {"prompt": "a cat", "n": 2, "size": "64x64", "seed": 7, "steps": 2},
        {"prompt": "a cat", "seed": 7, "num_images": 2, "steps": 2},
    ),
    (
        "/v1/images/generations",
        {"prompt": "a dog", "size": "96x64", "seed": 8, "steps": 2, "seg_sigma": 2, "model": "dall-e-3"},
        {"prompt": "a dog", "seed": 8, "steps": 2, "seg_sigma": 2, "width": 96},
    ),
    (
        "/v1/images/edits",
        Form(
            {
                "prompt": "a red cube",
                "seed": "9",
                "steps": "4",
                "strength": "0.75",
                "response_format": "b64_json",
            },
            {"image": INIT_PNG, "mask": OPENAI_MASK_PNG},
        ),
        {"prompt": "a red cube", "seed": 9, "steps": 4, "strength": 0.75, "image": INIT, "mask": MASK},
    ),
    (
        "/v1/images/edits",
        Form({"prompt": "a cat", "seed": "10", "steps": "4", "strength": "0.5"}, {"image": INIT_PNG}),
        {"prompt": "a cat", "seed": 10, "steps": 4, "strength": 0.5, "image": INIT},
    ),
    (
        "/sdapi/v1/txt2img",
        {"prompt": "two", "seed": 11, "steps": 2, "cfg_scale": 3, "width": 64, "height": 64, "batch_size": 2}
        | {"sampler_name": "Euler a"},
        {"prompt": "two", "seed": 11, "steps": 2, "cfg": 3, "num_images": 2, "scheduler": "euler_a"},
    ),
    (
        "/sdapi/v1/img2img",
        {"prompt": "a dog", "seed": 12, "steps": 4, "width": 64, "height": 64, "sampler_name": "Euler"}
        | {"init_images": [INIT_B64], "denoising_strength": 0.5},
        {"prompt": "a dog", "seed": 12, "steps": 4, "image": INIT, "strength": 0.5},
    ),
    (
        "/sdapi/v1/img2img",
        {"prompt": "a cat", "seed": 13, "steps": 4, "width": 64, "height": 64, "sampler_name": "Euler"}
        | {"init_images": [INIT_B64], "mask": MASK_B64, "mask_blur": 2, "inpainting_fill": 1}
        | {"inpaint_full_res": False, "denoising_strength": 0.75},
        {
            "prompt": "a cat",
            "seed": 13,
            "steps": 4,
            "image": INIT,
            "mask": MASK,
            "mask_blur": 2,
            "strength": 0.75,
        },
    ),
    (
        "/v1/generate",
        {"prompt": "a red cube", "seed": 14, "steps": 4, "init_image": INIT_B64, "strength": 0.5},
        {"prompt": "a red cube", "seed": 14, "steps": 4, "image": INIT, "strength": 0.5},
    ),
    (
        "/v1/generate",
        {"prompt": "two", "seed": 15, "steps": 4, "init_image": INIT_B64, "mask": MASK_B64, "mask_blur": 2}
        | {"strength": 0.75, "num_images": 2, "response": "json"},
        {"prompt": "two", "seed": 15, "steps": 4, "image": INIT, "mask": MASK, "mask_blur": 2}
        | {"strength": 0.75, "num_images": 2},
    ),
]
# every valid request: /v1/generate's text-to-image ones first (``VALID``), then ``ROUTE_VALID``
ALL_VALID = [("/v1/generate", b) for b in VALID] + [(r, b) for r, b, _ in ROUTE_VALID]
# (name, route, raw body / dict / Form, headers override, expected status, expected message part)
ROUTE_INVALID = [
    ("openai-n", "/v1/images/generations", {"prompt": "a", "n": 9}, None, 400, "n must be <= 4, got 9"),
    ("openai-n-text", "/v1/images/generations", {"prompt": "a", "n": "2"}, None, 400, "n: Input should be a valid integer"),
    ("openai-size", "/v1/images/generations", {"prompt": "a", "size": "64x64\n"}, None, 400, "size must be 'WIDTHxHEIGHT'"),
    ("openai-url", "/v1/images/generations", {"prompt": "a", "response_format": "url"}, None, 400, "does not host image files"),
    ("openai-model", "/v1/images/generations", {"prompt": "a", "model": "gpt-4o"}, None, 404, "this server serves 'tiny-sdxl'"),
    ("openai-steps", "/v1/images/generations", {"prompt": "a", "steps": 99}, None, 400, "steps must be <= 50, got 99"),
    ("openai-key", "/v1/images/generations", {"prompt": "a"}, "wrong-key", 401, '"code":"invalid_api_key"'),
    ("edit-no-alpha", "/v1/images/edits", Form({"prompt": "a"}, {"image": INIT_PNG, "mask": MASK_PNG}), None, 400, "mask must have an alpha channel"),
    ("edit-not-image", "/v1/images/edits", Form({"prompt": "a"}, {"image": b"no image"}), None, 400, "init_image is not an image"),
    ("edit-no-image", "/v1/images/edits", Form({"prompt": "a"}, {}), None, 400, "image must be one image file, got 0"),
    ("edit-strength", "/v1/images/edits", Form({"prompt": "a", "steps": "4", "strength": "0.1"}, {"image": INIT_PNG}), None, 400, "strength x steps must be >= 1"),
    ("edit-oversized", "/v1/images/edits", Form({"prompt": "a"}, {"image": BIG.encode()}), None, 413, "request body must be <="),
    ("edit-no-key", "/v1/images/edits", Form({"prompt": "a"}, {"image": INIT_PNG}), "no-key", 401, '"code":"invalid_api_key"'),
    ("a1111-sampler", "/sdapi/v1/txt2img", {"prompt": "a", "sampler_name": "DPM++ 2M Karras"}, None, 422, "sampler_name must be one of"),
    ("a1111-hires", "/sdapi/v1/txt2img", {"prompt": "a", "enable_hr": True}, None, 422, "enable_hr is not available on seg-rt"),
    ("a1111-override", "/sdapi/v1/txt2img", {"prompt": "a", "override_settings": [1]}, None, 422, "override_settings must be a mapping"),
    ("a1111-surrogate", "/sdapi/v1/txt2img", '{"prompt": "\\ud800", "steps": 2}', None, 422, "prompt is not valid Unicode text: a lone surrogate"),
    ("a1111-cfg", "/sdapi/v1/txt2img", {"prompt": "a", "cfg_scale": 0.5}, None, 422, "cfg must be a finite number >= 1"),
    ("a1111-key", "/sdapi/v1/txt2img", {"prompt": "a"}, "wrong-key", 401, '"error":"Unauthorized"'),
    ("img2img-none", "/sdapi/v1/img2img", {"prompt": "a", "init_images": []}, None, 422, "init_images must hold one base64 image"),
    ("img2img-fill", "/sdapi/v1/img2img", {"prompt": "a", "init_images": [INIT_B64], "mask": MASK_B64}, None, 422, "inpainting_fill must be 1 (original)"),
    ("img2img-strength", "/sdapi/v1/img2img", {"prompt": "a", "steps": 4, "init_images": [INIT_B64], "denoising_strength": 0.1}, None, 422, "strength x steps must be >= 1"),
    ("img2img-no-key", "/sdapi/v1/img2img", {"prompt": "a", "init_images": [INIT_B64]}, "no-key", 401, '"error":"Unauthorized"'),
    ("task-strength", "/v1/generate", {"prompt": "a", "steps": 4, "init_image": INIT_B64, "strength": 1.5}, None, 422, "strength must be in (0, 1]"),
    ("task-mask-alone", "/v1/generate", {"prompt": "a", "steps": 4, "mask": MASK_B64}, None, 422, "mask applies only with an init image"),
    ("task-not-base64", "/v1/generate", {"prompt": "a", "init_image": "not base64!"}, None, 422, "init_image must be base64-encoded image bytes"),
    ("task-mask-size", "/v1/generate", {"prompt": "a", "init_image": INIT_B64, "mask": HALF_MASK_B64}, None, 422, "mask is 64x32 but the init image is 64x64"),
]  # fmt: skip
ALL_INVALID = [(n, "/v1/generate", b, m, w, msg) for n, b, m, w, msg in INVALID] + ROUTE_INVALID


def send(port: int, key: str, body, mode: str | None, route: str = "/v1/generate") -> tuple[int, bytes]:
    """One POST to ``route`` (default /v1/generate); ``mode``: None, ``chunked`` (no Content-Length),
    ``wrong-key``, ``no-key``. ``body``: a dict (JSON), raw JSON text, or ``Form`` (multipart).
    /sdapi/ routes get the key as HTTP Basic auth's password, as ``webuiapi`` sends it."""
    content_type = "application/json"
    if isinstance(body, Form):
        content_type, data = body.encoded()
    else:
        data = body.encode() if isinstance(body, str) else json.dumps(body).encode()
    headers = {"Content-Type": content_type}
    if mode != "no-key":
        secret = "nope" if mode == "wrong-key" else key
        basic = base64.b64encode(f"anyone:{secret}".encode()).decode()
        headers["Authorization"] = f"Basic {basic}" if route.startswith("/sdapi/") else f"Bearer {secret}"
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=300)
    try:
        if mode == "chunked":
            chunks = (data[i : i + 65536] for i in range(0, len(data), 65536))
            conn.request("POST", route, body=chunks, headers=headers, encode_chunked=True)
        else:
            conn.request("POST", route, body=data, headers=headers)
        r = conn.getresponse()
        return r.status, r.read()
    except (ConnectionError, http.client.HTTPException) as exc:
        return -1, repr(exc).encode()  # the server dropped the connection: a failure
    finally:
        conn.close()


def pixels(png: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(png)).convert("RGB"))


def references(model: str) -> dict[int, list[np.ndarray]]:
    """Each valid request generated alone in this process, with the replica's one thread."""
    import torch

    import seg_rt
    from seg_rt.pipeline import load_pipeline

    pipe = load_pipeline(model, "cpu")
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        out = {}
        for k, b in enumerate(VALID):
            opts = {n: b[n] for n in ("steps", "cfg", "seg_sigma", "negative_prompt") if n in b}
            arr = seg_rt.generate(
                pipe,
                b["prompt"],
                seed=b["seed"],
                num_images=b.get("num_images", 1),
                height=b.get("height", SIZE),
                width=b.get("width", SIZE),
                output_type="np",
                **opts,
            )
            out[k] = [(a * 255).round().astype("uint8") for a in arr]
        for j, (_, _, kwargs) in enumerate(ROUTE_VALID):  # the other routes' requests, alone
            out[len(VALID) + j] = solo_images(pipe, kwargs)
        return out
    finally:
        torch.set_num_threads(before)


def solo_images(pipe, kwargs: dict) -> list[np.ndarray]:
    """One ``ROUTE_VALID`` request's solo run: ``seg_rt.generate`` with its arguments (``SIZE``
    square unless they say otherwise), as RGB arrays."""
    import seg_rt

    images = seg_rt.generate(pipe, **{"height": SIZE, "width": SIZE, **kwargs})
    return [np.asarray(im.convert("RGB")) for im in images]


def answer_pngs(route: str, body, raw: bytes) -> list[bytes]:
    """The PNGs of a 200 answer on ``route``."""
    if route.startswith("/v1/images/"):  # OpenAI: data[].b64_json
        return [base64.b64decode(d["b64_json"]) for d in json.loads(raw)["data"]]
    if route.startswith("/sdapi/"):  # A1111: images[] (base64)
        return [base64.b64decode(s) for s in json.loads(raw)["images"]]
    return (
        [base64.b64decode(s) for s in json.loads(raw)["images"]] if body.get("response") == "json" else [raw]
    )


def check_valid(k: int, status: int, raw: bytes, refs, name: str) -> str | None:
    """None when the answer is right, else why not."""
    route, body = ALL_VALID[k]
    if status != 200:
        return f"valid #{k} ({route}): status {status}: {raw[:200]!r}"
    pngs = answer_pngs(route, body, raw)
    if len(pngs) != len(refs[k]):
        return f"valid #{k} ({route}): {len(pngs)} images, want {len(refs[k])}"
    for png, ref in zip(pngs, refs[k], strict=True):
        text = Image.open(io.BytesIO(png)).text  # A1111: the infotext in parameters, the record beside
        record = json.loads(text["seg-rt" if route.startswith("/sdapi/") else "parameters"])
        if record["model"] != name:
            return f"valid #{k} ({route}): record model {record['model']!r}, want {name!r}"
        if not np.array_equal(pixels(png), ref):
            return f"valid #{k} ({route}): pixels differ from the solo result"
    return None


def tree_rss(pid: int) -> int:
    with contextlib.suppress(psutil.Error):
        root = psutil.Process(pid)
        total = 0
        for p in [root, *root.children(recursive=True)]:
            with contextlib.suppress(psutil.Error):
                total += p.memory_info().rss
        return total
    return 0


def wait_healthy(port: int, proc: subprocess.Popen, timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"seg-rt serve exited with {proc.returncode}")
        with (
            contextlib.suppress(OSError, urllib.error.URLError),
            urllib.request.urlopen(f"http://127.0.0.1:{port}/v1/health", timeout=5) as r,
        ):
            if r.status == 200:
                return
        time.sleep(1)
    raise RuntimeError("seg-rt serve did not become healthy")


def soak(seconds: float = 120, clients: int = 8, seed: int = 0) -> dict:
    from seg_rt.tiny import save_tiny_pipeline

    tmp = Path(tempfile.mkdtemp(prefix="segrt-soak-"))
    model = str(save_tiny_pipeline("sdxl", tmp / "tiny-sdxl"))
    key, port, ray_tmp = secrets.token_hex(16), free_port(), short_temp_dir()
    config = tmp / "serve.yaml"
    config.write_text(
        "num_replicas: 1\nmax_batch_size: 4\nbatch_wait_timeout_s: 0.05\nmax_ongoing_requests: 16\n"
        "max_queued_requests: 64\ndefault_height: 64\ndefault_width: 64\n"
    )
    cmd = [
        sys.executable,
        "-m",
        "seg_rt.cli",
        "serve",
        "--model",
        model,
        "--port",
        str(port),
        "--config",
        str(config),
        "--ray-temp-dir",
        ray_tmp,
    ]
    env = {**os.environ, "SEG_RT_API_KEY": key}
    proc = subprocess.Popen(
        cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True
    )
    stats: Counter = Counter()
    failures: list[str] = []
    lock = threading.Lock()
    rss: list[int] = []
    try:
        refs = references(model)  # while the server starts
        wait_healthy(port, proc)
        for k, (route, body) in enumerate(ALL_VALID):  # warm-up: every valid kind once, serially
            problem = check_valid(k, *send(port, key, body, None, route), refs, "tiny-sdxl")
            if problem:
                failures.append("warm-up " + problem)
        rss.append(tree_rss(proc.pid))
        deadline = time.monotonic() + seconds
        stop = threading.Event()

        def monitor() -> None:
            while not stop.wait(1.0):
                rss.append(tree_rss(proc.pid))

        def client(c: int) -> None:
            rng = random.Random(seed * 1000 + c)
            while time.monotonic() < deadline:
                if rng.random() < 0.5:
                    k = rng.randrange(len(ALL_VALID))
                    route, body = ALL_VALID[k]
                    status, raw = send(port, key, body, None, route)
                    problem = check_valid(k, status, raw, refs, "tiny-sdxl")
                    kind = "valid"
                else:
                    name, route, body, mode, want, message = rng.choice(ALL_INVALID)
                    status, raw = send(port, key, body, mode, route)
                    ok = status == want and message in raw.decode(errors="replace")
                    problem = None if ok else f"{name}: {status} {raw[:200]!r}, want {want} '{message}'"
                    kind = "invalid"
                with lock:
                    stats[f"{kind}_sent"] += 1
                    stats[f"{kind}_ok"] += problem is None
                    stats[f"status_{status}"] += 1
                    stats[f"route {route} {status}"] += 1
                    if problem and len(failures) < 20:
                        failures.append(problem)

        watcher = threading.Thread(target=monitor, daemon=True)
        watcher.start()
        threads = [threading.Thread(target=client, args=(c,)) for c in range(clients)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        stop.set()
        watcher.join()
        rss.append(tree_rss(proc.pid))
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(timeout=30)
        if proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        kill_ray_under(ray_tmp)
        shutil.rmtree(tmp, ignore_errors=True)
        shutil.rmtree(ray_tmp, ignore_errors=True)
    mb = [r / 2**20 for r in rss] or [0.0]
    five_xx = sum(v for k, v in stats.items() if k.startswith("status_5") or k == "status_-1")
    # bounded: after warm-up, the peak stays within 25% (or 300 MB) of the start
    bounded = mb[-1] > 0 and max(mb) <= mb[0] + max(0.25 * mb[0], 300)
    routes: dict[str, dict[str, int]] = {}
    for name, v in sorted(stats.items()):
        if name.startswith("route "):
            route, status = name.removeprefix("route ").rsplit(" ", 1)
            routes.setdefault(route, {})[status] = v
    passed = (
        not failures and five_xx == 0 and bounded and stats["valid_sent"] > 0 and stats["invalid_sent"] > 0
    )
    return {
        "seconds": seconds,
        "clients": clients,
        "requests": stats["valid_sent"] + stats["invalid_sent"],
        "valid": stats["valid_sent"],
        "valid_200_equal_solo": stats["valid_ok"],
        "invalid": stats["invalid_sent"],
        "invalid_own_4xx_and_message": stats["invalid_ok"],
        "status_counts": {
            k.removeprefix("status_"): v for k, v in sorted(stats.items()) if k.startswith("status_")
        },
        "route_status_counts": routes,
        "5xx_or_dropped": five_xx,
        "server_rss_mb": {"start": round(mb[0], 1), "peak": round(max(mb), 1), "end": round(mb[-1], 1)},
        "rss_bounded": bounded,
        "failures": failures,
        "passed": passed,
    }


# ---- the job API's soak ---------------------------------------------------------------------------

JOB_BODIES = [
    {"prompt": "yellow star on checks", "seed": 1, "steps": 3, "height": 32, "width": 32},
    {"prompt": "red circle on plain", "seed": 2, "steps": 2, "height": 32, "width": 32},
    {"prompt": "blue square on stripes", "seed": 3, "steps": 2, "seg_sigma": 2, "height": 32, "width": 32},
    {"prompt": "green star on plain", "seed": 4, "steps": 3, "height": 32, "width": 64},
    {"prompt": "two", "seed": 5, "steps": 2, "num_images": 2, "response": "json", "height": 32, "width": 32},
    {"prompt": "", "seed": 6, "steps": 2, "cfg": 1, "negative_prompt": "blur", "height": 32, "width": 32},
]
# image jobs (#27): the img2img and inpainting /v1/generate bodies of ``ROUTE_VALID`` as job bodies
# (their solo runs: ``solo_images``), and its invalid /v1/generate bodies, refused by POST /v1/jobs
# with the same status and message
IMAGE_JOBS = [(body, kwargs) for route, body, kwargs in ROUTE_VALID if route == "/v1/generate"]
ALL_JOB_BODIES = JOB_BODIES + [body for body, _ in IMAGE_JOBS]
JOB_INVALID = [
    (name, body, want, message)
    for name, route, body, mode, want, message in ROUTE_INVALID
    if route == "/v1/generate" and mode is None
]
STATE_CAP = 100_000  # jobs.max_bytes of the soak's server (~15 finished jobs): pruning runs throughout


def call(port: int, key: str | None, method: str, path: str, body=None) -> tuple[int, dict, bytes]:
    """One HTTP request on a fresh connection: (status, headers, body); -1 when the server dropped it."""
    headers = {"Content-Type": "application/json"}
    if key:
        headers["Authorization"] = f"Bearer {key}"
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=300)
    try:
        conn.request(method, path, body=None if body is None else json.dumps(body).encode(), headers=headers)
        r = conn.getresponse()
        return r.status, {k.lower(): v for k, v in r.getheaders()}, r.read()
    except (ConnectionError, http.client.HTTPException, TimeoutError) as exc:
        return -1, {}, repr(exc).encode()
    finally:
        conn.close()


def images_of(body: dict, raw: bytes) -> list[bytes]:
    """The PNG bytes of an answer (a PNG, or JSON with base64 images)."""
    if body.get("response") == "json":
        return [base64.b64decode(s) for s in json.loads(raw)["images"]]
    return [raw]


def folder_bytes(path: Path) -> int:
    total = 0
    for f in path.rglob("*"):
        with contextlib.suppress(OSError):
            if f.is_file():
                total += f.stat().st_size
    return total


@contextlib.contextmanager
def job_server(tmp: Path, model: str, key: str, in_process: bool):
    """(port, pid whose process tree is the server) of a server with a small state-folder cap."""
    settings = {
        "num_replicas": 1,
        "max_batch_size": 4,
        "batch_wait_timeout_s": 0.02,
        "max_ongoing_requests": 32,
        "max_queued_requests": 64,
        "state_dir": str(tmp / "state"),
        "jobs": {"queue_length": 64, "max_bytes": STATE_CAP, "retention_s": 3600, "preview_every": 1},
    }
    if in_process:
        import torch

        from seg_rt.cluster.serving.config import ServeConfig
        from seg_rt.cluster.serving.core import ServingCore
        from seg_rt.cluster.serving.http import build_app
        from seg_rt.pipeline import load_pipeline

        from .live_server import live_server, torch_threads

        fields = {k: settings[k] for k in ("max_batch_size", "state_dir", "jobs")}
        core = ServingCore(ServeConfig(model=model, api_keys=[key], **fields), load_pipeline(model, "cpu"))
        try:
            with torch.inference_mode(), torch_threads(1), live_server(build_app(core)) as url:
                yield int(url.rsplit(":", 1)[1]), os.getpid()
        finally:
            core.close()
        return
    import yaml

    port, ray_tmp = free_port(), short_temp_dir()
    config = tmp / "serve.yaml"
    config.write_text(yaml.safe_dump(settings))
    cmd = [sys.executable, "-m", "seg_rt.cli", "serve", "--model", model, "--port", str(port)]
    cmd += ["--config", str(config), "--ray-temp-dir", ray_tmp]
    env = {**os.environ, "SEG_RT_API_KEY": key}
    proc = subprocess.Popen(
        cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True
    )
    try:
        wait_healthy(port, proc)
        yield port, proc.pid
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(timeout=30)
        if proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        kill_ray_under(ray_tmp)
        shutil.rmtree(ray_tmp, ignore_errors=True)


def soak_jobs(
    seconds: float = 120,
    clients: int = 8,
    seed: int = 0,
    in_process: bool = False,
    image_jobs: int = len(IMAGE_JOBS),
) -> dict:
    """The job API under ``clients`` threads for ``seconds`` (see the module docstring), with the
    first ``image_jobs`` of ``IMAGE_JOBS`` among its bodies (the short version: the cheap ones)."""
    bodies = ALL_JOB_BODIES[: len(JOB_BODIES) + image_jobs]
    from seg_rt.demo.model import weights_dir

    model = str(weights_dir())
    started = time.monotonic()
    tmp = Path(tempfile.mkdtemp(prefix="segrt-jobsoak-"))
    key = secrets.token_hex(16)
    stats: Counter = Counter()
    failures: list[str] = []
    lock = threading.Lock()
    rss: list[int] = []
    state: list[int] = []
    durations: dict[str, list[float]] = {"blocking": [], "job": []}

    def fail(problem: str) -> None:
        with lock:
            if len(failures) < 20:
                failures.append(problem)

    try:
        with job_server(tmp, model, key, in_process) as (port, pid):
            # the solo runs: each body alone, before any concurrency; their pixels = seg_rt.generate here
            solo: dict[int, list[bytes]] = {}
            for k, body in enumerate(bodies):
                status, _, raw = call(port, key, "POST", "/v1/generate", body)
                if status != 200:
                    raise RuntimeError(f"solo run #{k}: {status} {raw[:200]!r}")
                solo[k] = images_of(body, raw)
            refs = job_references(model, image_jobs)
            for k, pngs in solo.items():
                if any(not np.array_equal(pixels(p), r) for p, r in zip(pngs, refs[k], strict=True)):
                    failures.append(f"solo run #{k}: pixels differ from seg_rt.generate")
            rss.append(tree_rss(pid))
            state.append(folder_bytes(tmp / "state"))
            deadline = time.monotonic() + seconds
            stop = threading.Event()

            def monitor() -> None:
                while not stop.wait(1.0):
                    rss.append(tree_rss(pid))
                    state.append(folder_bytes(tmp / "state"))

            def count(status: int) -> None:
                with lock:
                    stats[f"status_{status}"] += 1

            def finish(job_id: str, k: int, cancelled: bool, rng) -> None:
                """Poll a job to its end; check its final state and result."""
                while True:
                    status, _, raw = call(port, key, "GET", f"/v1/jobs/{job_id}")
                    count(status)
                    if status != 200:
                        return fail(f"job {job_id}: status poll {status} {raw[:200]!r}")
                    view = json.loads(raw)
                    if view["status"] in ("succeeded", "failed", "cancelled"):
                        break
                    time.sleep(rng.uniform(0.1, 0.4))
                final = view["status"]
                with lock:
                    stats[f"job_{final}"] += 1
                if final == "failed" or (final == "cancelled" and not cancelled):
                    return fail(f"job {job_id}: {final} ({view['error']})")
                status, _, raw = call(port, key, "GET", f"/v1/jobs/{job_id}/result")
                count(status)
                if final == "cancelled":
                    if status != 409:
                        fail(f"cancelled job {job_id}: result {status}, want 409")
                    return None
                if status != 200:
                    return fail(f"job {job_id}: result {status} {raw[:200]!r} (lost?)")
                if images_of(bodies[k], raw) != solo[k]:
                    return fail(f"job {job_id} (body #{k}): bytes differ from the solo run")
                with lock:
                    stats["job_bytes_equal_solo"] += 1
                    stats["image_job_bytes_equal_solo"] += k >= len(JOB_BODIES)
                return None

            def client(c: int) -> None:
                rng = random.Random(seed * 1000 + c)
                # each image job and an invalid one come first (one client each), then a random mix
                opening = [("job", len(JOB_BODIES) + j) for j in range(image_jobs)] + [("invalid", 0)]
                first = opening[c] if c < len(opening) else None
                while time.monotonic() < deadline:
                    k = rng.randrange(len(bodies))
                    action = rng.choices(("blocking", "job", "cancel", "list", "invalid"), (3, 4, 2, 1, 1))[0]
                    if first is not None:
                        (action, k), first = first, None
                    body = bodies[k]
                    with lock:
                        stats[f"{action}_sent"] += 1
                    t0 = time.monotonic()
                    if action == "invalid":
                        name, bad, want, message = rng.choice(JOB_INVALID)
                        status, _, raw = call(port, key, "POST", "/v1/jobs", bad)
                        count(status)
                        if status != want or message not in raw.decode(errors="replace"):
                            fail(f"invalid job {name}: {status} {raw[:200]!r}, want {want} '{message}'")
                        else:
                            with lock:
                                stats["invalid_own_4xx_and_message"] += 1
                        continue
                    if action == "blocking":
                        status, _, raw = call(port, key, "POST", "/v1/generate", body)
                        count(status)
                        if status != 200:
                            fail(f"blocking #{k}: {status} {raw[:200]!r}")
                        elif images_of(body, raw) != solo[k]:
                            fail(f"blocking #{k}: bytes differ from the solo run")
                        else:
                            with lock:
                                stats["blocking_bytes_equal_solo"] += 1
                                durations["blocking"].append(time.monotonic() - t0)
                        continue
                    if action == "list":
                        status, _, raw = call(port, key, "GET", "/v1/jobs")
                        count(status)
                        if status != 200:
                            fail(f"list: {status} {raw[:200]!r}")
                        continue
                    status, headers, raw = call(port, key, "POST", "/v1/jobs", body)
                    count(status)
                    if status == 429:  # a full queue is an answer, not a failure: wait as told
                        time.sleep(float(headers.get("retry-after", 1)))
                        continue
                    if status != 202:
                        fail(f"submit #{k}: {status} {raw[:200]!r}")
                        continue
                    job_id = json.loads(raw)["id"]
                    with lock:
                        stats["jobs_submitted"] += 1
                        stats["image_jobs_submitted"] += k >= len(JOB_BODIES)
                    if action == "cancel":
                        time.sleep(rng.uniform(0.0, 0.3))
                        status, _, raw = call(port, key, "DELETE", f"/v1/jobs/{job_id}")
                        count(status)
                        if status != 200:
                            fail(f"cancel {job_id}: {status} {raw[:200]!r}")
                    finish(job_id, k, action == "cancel", rng)
                    if action == "job":
                        with lock:
                            durations["job"].append(time.monotonic() - t0)

            watcher = threading.Thread(target=monitor, daemon=True)
            watcher.start()
            threads = [threading.Thread(target=client, args=(c,)) for c in range(clients)]
            for t in threads:
                t.start()
            for t in threads:
                t.join()
            stop.set()
            watcher.join()
            rss.append(tree_rss(pid))
            state.append(folder_bytes(tmp / "state"))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    mb = [r / 2**20 for r in rss] or [0.0]
    five_xx = sum(v for k, v in stats.items() if k.startswith("status_5") or k == "status_-1")
    ended = stats["job_succeeded"] + stats["job_cancelled"] + stats["job_failed"]
    lost = stats["jobs_submitted"] - ended
    rss_bounded = mb[-1] > 0 and max(mb) <= mb[0] + max(0.25 * mb[0], 300)
    # the cap, plus the folders of the jobs in flight (one per client: queued, running, or finished
    # and not yet pruned), each at most the largest body's outputs, inputs and record
    slack = clients * max(job_bytes(b, solo[k]) for k, b in enumerate(bodies)) if solo else 100_000
    state_bounded = max(state) <= STATE_CAP + slack
    passed = (
        not failures
        and five_xx == 0
        and lost == 0
        and rss_bounded
        and state_bounded
        and stats["job_bytes_equal_solo"] > 0
        and stats["job_cancelled"] > 0
        and stats["blocking_bytes_equal_solo"] > 0
        and stats["image_job_bytes_equal_solo"] >= (image_jobs > 0)
        and stats["invalid_own_4xx_and_message"] == stats["invalid_sent"] > 0
    )

    def p50(xs: list[float]) -> float | None:
        return round(sorted(xs)[len(xs) // 2], 3) if xs else None

    return {
        "what": "job API soak",
        "server": "in-process uvicorn" if in_process else "seg-rt serve (Ray Serve)",
        "model": "seg-rt-demo",
        "seconds": seconds,
        "clients": clients,
        "sent": {a: stats[f"{a}_sent"] for a in ("blocking", "job", "cancel", "list", "invalid")},
        "jobs_submitted": stats["jobs_submitted"],
        "image_jobs_submitted": stats["image_jobs_submitted"],
        "jobs_succeeded": stats["job_succeeded"],
        "jobs_cancelled": stats["job_cancelled"],
        "jobs_failed": stats["job_failed"],
        "jobs_lost": lost,
        "job_bytes_equal_solo": stats["job_bytes_equal_solo"],
        "image_job_bytes_equal_solo": stats["image_job_bytes_equal_solo"],
        "invalid_own_4xx_and_message": stats["invalid_own_4xx_and_message"],
        "blocking_bytes_equal_solo": stats["blocking_bytes_equal_solo"],
        "p50_seconds": {
            "blocking": p50(durations["blocking"]),
            "job_submit_to_result": p50(durations["job"]),
        },
        "status_counts": {
            k.removeprefix("status_"): v for k, v in sorted(stats.items()) if k.startswith("status_")
        },
        "5xx_or_dropped": five_xx,
        "server_rss_mb": {"start": round(mb[0], 1), "peak": round(max(mb), 1), "end": round(mb[-1], 1)},
        "rss_bounded": rss_bounded,
        "state_dir_bytes": {"cap": STATE_CAP, "bound": STATE_CAP + slack}
        | {"start": state[0], "peak": max(state), "end": state[-1]},
        "state_bounded": state_bounded,
        "wall_seconds": round(time.monotonic() - started, 1),
        "failures": failures,
        "passed": passed,
    }


def job_bytes(body: dict, pngs: list[bytes], record: int = 16_384) -> int:
    """A bound on one job's folder: its output PNGs, its input images (as sent) and ``record``
    bytes for its ``job.json`` (and an input image's re-encoding)."""
    inputs = sum(len(base64.b64decode(body[k])) for k in ("init_image", "mask") if k in body)
    return sum(map(len, pngs)) + inputs + record


def job_references(model: str, image_jobs: int = len(IMAGE_JOBS)) -> dict[int, list[np.ndarray]]:
    """Each job body generated alone in this process (``seg_rt.generate``), with one thread."""
    import torch

    import seg_rt
    from seg_rt.pipeline import load_pipeline

    pipe = load_pipeline(model, "cpu")
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        out = {}
        for k, b in enumerate(JOB_BODIES):
            opts = {
                n: b[n] for n in ("steps", "cfg", "seg_sigma", "negative_prompt", "height", "width") if n in b
            }
            arr = seg_rt.generate(
                pipe, b["prompt"], seed=b["seed"], num_images=b.get("num_images", 1), output_type="np", **opts
            )
            out[k] = [(a * 255).round().astype("uint8") for a in arr]
        for j, (_, kwargs) in enumerate(IMAGE_JOBS[:image_jobs]):  # as the soak's routes run them
            out[len(JOB_BODIES) + j] = solo_images(pipe, kwargs)
        return out
    finally:
        torch.set_num_threads(before)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=120)
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--jobs", action="store_true", help="the job API's soak on the demo model")
    parser.add_argument("--in-process", action="store_true", help="--jobs: uvicorn in this process, no Ray")
    args = parser.parse_args(argv)
    if args.jobs:
        summary = soak_jobs(args.seconds, args.clients, args.seed, args.in_process)
    else:
        summary = soak(args.seconds, args.clients, args.seed)
    print(json.dumps(summary))
    return 0 if summary["passed"] else 1


if __name__ == "__main__":
    sys.exit(main())
