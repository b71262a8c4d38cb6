"""The denoiser protocol, the shared fixed-shape engine logic, engine lifetimes and model families.

ONNX Runtime runs against real exports in ``test_export.py``; here the shared base class is driven
by a small torch-only engine, so its padding / shape / σ rules are tested without any runtime.
TensorRT cannot be installed on these machines: what surrounds it (the base class it shares with
ONNX Runtime, and the one-line error when it is missing) is tested instead.
"""

from __future__ import annotations

import inspect
import math
import sys
import types

import pytest
import torch

import seg_rt
import seg_rt.engines
from seg_rt.artifacts import RUNTIME_SIGMA, ArtifactInfo
from seg_rt.cli import main
from seg_rt.engines import Denoiser, FixedShapeDenoiser, ShapeSpec, TorchDenoiser, load_engine
from seg_rt.engines.onnxruntime import OnnxRuntimeDenoiser
from seg_rt.engines.tensorrt import TensorRTDenoiser
from seg_rt.errors import EnvironmentUnavailable
from seg_rt.families import family_of

from .tolerance import assert_close

ENGINE_CLASSES = [TorchDenoiser, OnnxRuntimeDenoiser, TensorRTDenoiser]


def artifact(folder, *, kind="onnx", sigma=2.0, blur_lengths=()):
    """A sidecar for a 1-image [uncond, cond, seg] engine at latent 4x6, plus an empty model file."""
    info = ArtifactInfo(
        kind=kind, family="sd15", model="m", height=32, width=48, latent_height=4, latent_width=6, batch=1,
        branches=("uncond", "cond", "seg"), input_names=("sample", "timestep", "encoder_hidden_states",
        "seg_mask", *(f"seg_blur_{n}" for n in blur_lengths)), output_names=("out_sample",),
        dtype="float32", sigma=sigma, layers=("mid",), layer_names=("mid_block.attentions.0.attn1",),
        blur_lengths=tuple(blur_lengths), opset=18, file="model.bin",
    )  # fmt: skip
    folder.mkdir(parents=True, exist_ok=True)
    info.write(folder)
    (folder / "model.bin").write_bytes(b"")
    return folder


class EchoEngine(FixedShapeDenoiser):
    """A fixed-shape engine in plain torch: ``out = 2 * sample + seg_mask``; records what it ran."""

    kind = "onnx"
    file_label = "echo model"

    def __init__(self, folder):
        super().__init__(folder)
        self.blur: dict = {}
        self.runs: list = []
        self.configure(self.sigma)

    def _set_blur(self, matrices):
        self.blur = dict(matrices)

    def _run(self, inputs):
        self.runs.append(inputs)
        return 2 * inputs["sample"] + inputs["seg_mask"].float().view(-1, 1, 1, 1)

    def _release(self):
        pass


def request(rows, h=4, w=6, perturbed=0):
    g = torch.Generator().manual_seed(rows)
    mask = torch.zeros(rows, dtype=torch.bool)
    mask[rows - perturbed :] = True
    return {
        "sample": torch.randn(rows, 4, h, w, generator=g),
        "timestep": torch.full((rows,), 10.0),
        "encoder_hidden_states": torch.randn(rows, 7, 16, generator=g),
        "seg_mask": mask,
    }


@pytest.mark.parametrize("cls", ENGINE_CLASSES, ids=lambda c: c.__name__)
def test_every_engine_implements_the_whole_protocol(cls):
    assert issubclass(cls, Denoiser) and not inspect.isabstract(cls)
    for name in ("configure", "__call__", "close", "__enter__", "__exit__"):
        assert callable(getattr(cls, name))
    assert list(inspect.signature(cls.configure).parameters) == ["self", "sigma", "layers"]


def test_an_incomplete_engine_cannot_be_built():
    class NoClose(Denoiser):
        def configure(self, sigma, layers=None): ...

        def __call__(self, inputs):
            return inputs["sample"]

    with pytest.raises(TypeError, match="close"):
        NoClose()


def test_fixed_engine_pads_short_requests_with_unperturbed_rows_and_cuts_them(tmp_path):
    engine = EchoEngine(artifact(tmp_path / "e"))
    assert engine.shapes == ShapeSpec(3, 4, 6) and engine.images_per_run == 1
    req = request(2, perturbed=1)
    out = engine(req)
    ran = engine.runs[-1]
    assert ran["sample"].shape[0] == 3 and ran["seg_mask"].tolist() == [False, True, False]
    assert torch.equal(ran["sample"][2], req["sample"][1]) and torch.equal(
        ran["timestep"][2], req["timestep"][1]
    )
    assert out.shape == req["sample"].shape
    assert torch.equal(out, 2 * req["sample"] + torch.tensor([0.0, 1.0]).view(-1, 1, 1, 1))


def test_fixed_engine_rejects_other_shapes_and_missing_inputs(tmp_path):
    engine = EchoEngine(artifact(tmp_path / "e"))
    video = request(3)
    video["sample"] = video["sample"][:, :, None]  # [B, C, F, h, w]: a video batch to an image export
    with pytest.raises(ValueError, match=r"takes image latents \(a 4-d sample\), got a 5-d sample"):
        engine(video)
    with pytest.raises(ValueError, match=r"engine accepts batch x latent height x width = 3x4x6, got 3x4x8"):
        engine(request(3, w=8))
    with pytest.raises(ValueError, match=r"= 3x4x6, got 6x4x6"):
        engine(request(6))
    req = request(3)
    del req["encoder_hidden_states"]
    with pytest.raises(ValueError, match=r"engine input\(s\) encoder_hidden_states missing from the request"):
        engine(req)
    assert not engine.runs


def test_baked_sigma_engine_checks_sigma_and_layers(tmp_path):
    engine = EchoEngine(artifact(tmp_path / "e", sigma=math.inf))
    engine.configure(math.inf, ["mid"])
    engine.configure(1e6, ["mid_block.attentions.0.attn1"])  # above 9999 is infinite blur too
    assert engine.blur == {}
    with pytest.raises(ValueError, match="seg sigma inf baked in, got 3"):
        engine.configure(3.0, ["mid"])
    with pytest.raises(ValueError, match="exported for seg layers mid, got up"):
        engine.configure(math.inf, ["up"])


def test_runtime_sigma_engine_feeds_blur_matrices(tmp_path):
    engine = EchoEngine(artifact(tmp_path / "e", sigma=RUNTIME_SIGMA, blur_lengths=(4, 6)))
    assert set(engine.blur) == {"seg_blur_4", "seg_blur_6"}  # configured for σ = inf when loaded
    for n in (4, 6):  # infinite blur: every position becomes the mean over all positions
        assert torch.allclose(engine.blur[f"seg_blur_{n}"], torch.full((n, n), 1 / n), atol=1e-7)
    engine.configure(1.0, ["mid"])
    m = engine.blur["seg_blur_6"]
    assert engine.sigma == 1.0 and torch.allclose(m.sum(1), torch.ones(6), atol=1e-6)
    assert m[3, 3] > m[3, 2] > m[3, 1] > 0  # a Gaussian centred on each row's own position


def test_fixed_engine_reads_its_sidecar(tmp_path):
    with pytest.raises(ValueError, match="holds a tensorrt artifact; this engine runs onnx artifacts"):
        EchoEngine(artifact(tmp_path / "t", kind="tensorrt"))
    folder = artifact(tmp_path / "m")
    (folder / "model.bin").unlink()
    with pytest.raises(FileNotFoundError, match=r"echo model .*model\.bin' is missing"):
        EchoEngine(folder)


def test_closed_engines_refuse_calls_and_with_closes(tmp_path):
    with EchoEngine(artifact(tmp_path / "e")) as engine:
        engine(request(3))
    assert engine.closed
    with pytest.raises(RuntimeError, match="EchoEngine is closed"):
        engine(request(3))


def test_missing_tensorrt_is_one_clear_line(tmp_path, monkeypatch, capsys):
    from seg_rt.demo.model import weights_dir

    folder = artifact(tmp_path / "trt", kind="tensorrt")
    monkeypatch.setitem(sys.modules, "tensorrt", None)
    with pytest.raises(ImportError) as err:
        load_engine(f"trt:{folder}")
    assert (
        str(err.value) == "tensorrt is not installed (needed for TensorRT engines): pip install 'seg-rt[gpu]'"
    )
    args = [
        "generate",
        "--model",
        str(weights_dir()),
        "--engine",
        f"trt:{folder}",
        "--out",
        str(tmp_path / "x.png"),
    ]
    assert main(args) == 2
    assert capsys.readouterr().err.strip().splitlines() == [f"seg-rt: error: {err.value}"]
    assert not (tmp_path / "x.png").exists()


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-GPU path")
def test_tensorrt_without_gpu_is_an_environment_error(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "tensorrt", types.ModuleType("tensorrt"))
    with pytest.raises(EnvironmentUnavailable, match="TensorRT engines need an NVIDIA GPU"):
        TensorRTDenoiser(artifact(tmp_path / "trt", kind="tensorrt"))


def _processors(unet) -> dict:
    return {k: type(v) for k, v in unet.attn_processors.items()}


def test_torch_denoiser_close_restores_the_model_and_refuses_calls(sd15):
    before = _processors(sd15.unet)
    den = TorchDenoiser(sd15.unet, sigma=2.0)
    assert _processors(sd15.unet) != before
    den.close()
    den.close()  # twice is fine
    assert _processors(sd15.unet) == before
    with pytest.raises(RuntimeError, match="TorchDenoiser is closed"):
        den(request(2))


def test_torch_compile_is_recompiled_when_layers_change(sd15, monkeypatch):
    """``configure`` with other layers must not drop ``torch.compile``: the new model is compiled."""
    compiled = []

    def fake_compile(model):  # stands in for torch.compile (slow on CPU): records what it wraps
        def run(inputs):
            compiled.append(model)
            return model(inputs)

        run.model = model
        return run

    monkeypatch.setattr(torch, "compile", fake_compile)
    inputs = {
        **request(2, h=8, w=8, perturbed=1),
        "encoder_hidden_states": torch.randn(2, 77, sd15.unet.config.cross_attention_dim),
    }
    with TorchDenoiser(sd15.unet, sigma=2.0, compile=True) as den:
        den(inputs)
        first = den.model
        den.configure(2.0, ["up"])
        assert den.model is not first and den._call.model is den.model
        out = den(inputs)
        assert compiled == [first, den.model]
        den.configure(3.0, ["up"])  # same layers: σ only, no new model
        assert den._call.model is den.model
    with TorchDenoiser(sd15.unet, sigma=2.0, layers=["up"]) as eager:
        assert torch.equal(out, eager(inputs))


STEPS_AND_SIGMAS = [(700.0, 2.0), (500.0, 3.0), (500.0, math.inf), (100.0, 2.0)]


def test_torch_compile_does_not_recompile_across_steps_or_sigma(sd15, monkeypatch):
    """The compiled denoiser reads its blur matrices as tensors (refilled in place for a new σ): new
    timesteps, latents and σ values (inf included) run the first graph, and each σ still takes
    effect (equal to the eager denoiser at that σ). Dynamo's guards decide recompiles whatever the
    backend, so the test compiles with the fast ``eager`` backend (inductor's C++ build is minutes)."""
    import functools

    from torch._dynamo.utils import counters

    from seg_rt.sampler import build_batch

    monkeypatch.setattr(torch, "compile", functools.partial(torch.compile, backend="eager"))
    g = torch.Generator().manual_seed(0)
    c = sd15.unet.config.cross_attention_dim
    x = torch.randn(1, 4, 8, 8, generator=g)
    cond = {"encoder_hidden_states": torch.randn(1, 7, c, generator=g)}
    uncond = {"encoder_hidden_states": torch.randn(1, 7, c, generator=g)}

    def batch(t, scale=1.0):
        return build_batch(["uncond", "cond", "seg"], x * scale, torch.tensor(t), cond, uncond)

    torch.compiler.reset()
    counters.clear()
    outs = {}
    with TorchDenoiser(sd15.unet, sigma=2.0, compile=True) as den:
        den(batch(900.0))
        graphs = counters["stats"]["unique_graphs"]
        monkeypatch.setattr(torch._dynamo.config, "error_on_recompile", True)
        for t, sigma in STEPS_AND_SIGMAS:
            den.configure(sigma)
            outs[t, sigma] = den(batch(t, 0.5))
        assert counters["stats"]["unique_graphs"] == graphs
    torch.compiler.reset()
    with TorchDenoiser(sd15.unet, sigma=2.0) as eager:
        for t, sigma in STEPS_AND_SIGMAS:
            eager.configure(sigma)
            want = eager(batch(t, 0.5))
            assert_close(outs[t, sigma], want, rel=1e-5, what=f"compiled vs eager at t={t:g}, σ={sigma}")
    assert (outs[500.0, 3.0] - outs[500.0, math.inf]).abs().max() > 1e-4  # σ reached the compiled graph


def test_generate_closes_the_engine_it_loads_and_keeps_the_callers(sd15, monkeypatch):
    loaded = []

    def spy(*args, **kwargs):
        loaded.append(load_engine(*args, **kwargs))
        return loaded[-1]

    before = _processors(sd15.unet)
    monkeypatch.setattr(seg_rt.engines, "load_engine", spy)
    kw = {"steps": 1, "height": 64, "width": 64, "output_type": "latent"}
    seg_rt.generate(sd15, "a", **kw)
    assert len(loaded) == 1 and loaded[0].closed and _processors(sd15.unet) == before
    with TorchDenoiser(sd15.unet, sigma=2.0) as mine:
        seg_rt.generate(sd15, "a", engine=mine, **kw)
        assert not mine.closed
    with pytest.raises(
        TypeError, match=r"engine must be a seg_rt\.engines\.Denoiser or an engine spec string, got function"
    ):
        seg_rt.generate(sd15, "a", engine=lambda inputs: inputs["sample"], **kw)


def test_family_is_decided_by_class_not_by_name(sd15):
    from diffusers import StableDiffusionPipeline

    from seg_rt.tiny import tiny_pipeline

    assert family_of(sd15).name == "sd15"
    assert family_of(tiny_pipeline("sdxl")).name == "sdxl"
    assert family_of(tiny_pipeline("sdxl-controlnet")).name == "sdxl-controlnet"
    sub = type("MyPipeline", (StableDiffusionPipeline,), {})
    assert family_of(sub.__new__(sub)).name == "sd15"  # a subclass belongs to its base's family
    impostor = type("StableDiffusionXLPipeline", (), {})  # the right name, the wrong class
    with pytest.raises(ValueError, match="unsupported pipeline StableDiffusionXLPipeline"):
        family_of(impostor())
