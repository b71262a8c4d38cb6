"""ONNX export, the ONNX Runtime engine, TensorRT checks (TensorRT itself only where installed)."""

import json
import math
import sys

import numpy as np
import pytest
import torch
from PIL import Image

import seg_rt
from seg_rt.artifacts import ArtifactInfo, read_info
from seg_rt.cli import main
from seg_rt.denoiser import SEGUNet
from seg_rt.engines.onnxruntime import OnnxRuntimeDenoiser
from seg_rt.export import export_onnx
from seg_rt.export.checks import blur_is_matmul, op_counts, tensorrt_unsupported
from seg_rt.families import family_of

from .tolerance import assert_close

pytestmark = pytest.mark.slow

H, W = 64, 96


@pytest.fixture(scope="module")
def exports(sdxl, tmp_path_factory):
    """One tiny SDXL, exported with σ baked at 1, 2, 10, inf and with runtime σ (cached per module)."""
    root = tmp_path_factory.mktemp("onnx")
    cache = {}

    def get(sigma):
        key = "dyn" if sigma is None else str(sigma)
        if key not in cache:
            cache[key] = export_onnx(sdxl, root / key, height=H, width=W, sigma=sigma).folder
        return cache[key]

    return get


def engine_inputs(sdxl, rows=3, batch=1):
    model = SEGUNet(sdxl.unet, sigma=1.0)
    try:
        return family_of(sdxl).export_inputs(sdxl, model, rows, batch, H, W, torch.float32, seed=1)
    finally:
        model.remove()


def test_export_writes_validated_fixed_shape_graph(exports):
    folder = exports(2.0)
    info = read_info(folder)
    assert info.input_names == (
        "sample",
        "timestep",
        "encoder_hidden_states",
        "text_embeds",
        "time_ids",
        "seg_mask",
    )
    assert info.output_names == ("out_sample",) and info.rows == 3 and info.sigma == 2.0
    assert (info.latent_height, info.latent_width) == (8, 12)
    import onnx

    model = onnx.load(str(folder / "denoiser.onnx"), load_external_data=False)
    meta = {p.key: p.value for p in model.metadata_props}
    recorded = json.loads(meta["seg_rt"])
    assert recorded["sigma"] == 2.0 and recorded["layers"] == ["mid"] and recorded["opset"] == 18
    assert recorded["versions"]["seg_rt"] == seg_rt.__version__
    shapes = {i.name: [d.dim_value for d in i.type.tensor_type.shape.dim] for i in model.graph.input}
    assert shapes["sample"] == [3, 4, 8, 12] and shapes["seg_mask"] == [3]
    # the blur is the separable MatMul op, never a k×k conv with reflect padding
    assert blur_is_matmul(folder / "denoiser.onnx")
    assert not tensorrt_unsupported(folder / "denoiser.onnx")


def test_dynamic_sigma_graph_takes_blur_matrices(exports):
    info = read_info(exports(None))
    assert info.dynamic_sigma and info.blur_lengths == (4, 6)  # the 64x96 mid-block grid is 4x6
    assert {"seg_blur_4", "seg_blur_6"} <= set(info.input_names)


@pytest.mark.parametrize("sigma", [1.0, 10.0, math.inf])
def test_dynamic_sigma_equals_baked(exports, sdxl, sigma):
    inputs = engine_inputs(sdxl)
    with OnnxRuntimeDenoiser(exports(sigma)) as engine:
        baked = engine(inputs)
    with OnnxRuntimeDenoiser(exports(None)) as dyn:
        dyn.configure(sigma, ["mid"])
        assert_close(dyn(inputs), baked, rel=1e-5, what="dynamic vs baked sigma")


@pytest.mark.parametrize("sigma", [2.0, None])
def test_generate_with_onnx_engine_matches_torch_image(exports, sdxl_dir, tmp_path, sigma):
    folder = exports(sigma)
    common = ["generate", "--model", str(sdxl_dir), "--height", str(H), "--width", str(W), "--steps", "4",
              "--seg-sigma", "2", "--no-progress"]  # fmt: skip
    assert main([*common, "--out", str(tmp_path / "t.png")]) == 0
    assert main([*common, "--engine", f"onnx:{folder}", "--out", str(tmp_path / "o.png")]) == 0
    a = np.asarray(Image.open(tmp_path / "t.png"), dtype=int)
    b = np.asarray(Image.open(tmp_path / "o.png"), dtype=int)
    assert np.abs(a - b).max() <= 2


def test_fixed_engine_pads_fewer_rows(exports, sdxl):
    """Outside the SEG window the batch has 2 rows; the 3-row engine pads and cuts."""
    kw = {"steps": 4, "height": H, "width": W, "seg_sigma": 2.0, "seg_start": 0.5, "output_type": "latent"}
    ours = seg_rt.generate(sdxl, "a", **kw)
    onnx = seg_rt.generate(sdxl, "a", engine=f"onnx:{exports(2.0)}", **kw)
    assert_close(onnx, ours, rel=1e-4, what="ONNX Runtime vs torch latents")


def test_export_then_eager_in_one_process(exports, sdxl):
    """Tracing must leave no fake tensors behind (blur-matrix cache regression)."""
    exports(2.0)
    out = seg_rt.generate(sdxl, "a", steps=1, height=H, width=W, seg_sigma=2.0, output_type="latent")
    assert type(out) is torch.Tensor and torch.isfinite(out).all()


@pytest.mark.parametrize("family", ["sd15", "sdxl-controlnet"])
def test_other_families_export_and_validate(family, tmp_path):
    from seg_rt.tiny import tiny_pipeline

    result = export_onnx(
        tiny_pipeline(family), tmp_path / family, height=64, width=64, sigma=None, with_cfg=False
    )
    assert result.validation["max_abs_error"] < 1e-4
    assert result.info.rows == 2 and result.info.branches == ("cond", "seg")
    if family == "sdxl-controlnet":
        assert {"controlnet_cond", "conditioning_scale"} <= set(result.info.input_names)


def test_engine_rejects_other_shapes_naming_both(exports, sdxl):
    with OnnxRuntimeDenoiser(exports(2.0)) as engine:
        _check_rejections(engine, sdxl)


def _check_rejections(engine, sdxl):
    inputs = engine_inputs(sdxl)
    inputs["sample"] = torch.randn(3, 4, 8, 8)
    with pytest.raises(ValueError, match=r"engine accepts batch x latent height x width = 3x8x12, got 3x8x8"):
        engine(inputs)
    big = {k: torch.cat([v, v]) for k, v in engine_inputs(sdxl).items()}
    with pytest.raises(ValueError, match="= 3x8x12, got 6x8x12"):
        engine(big)
    with pytest.raises(ValueError, match="seg sigma 2 baked in, got 5"):
        engine.configure(5.0, ["mid"])
    with pytest.raises(ValueError, match="exported for seg layers mid, got up"):
        engine.configure(2.0, ["up"])


def test_onnx_engine_is_a_fixed_shape_denoiser_and_closes(exports, sdxl):
    from seg_rt.engines import FixedShapeDenoiser, load_engine

    inputs = engine_inputs(sdxl)
    with load_engine(f"onnx:{exports(None)}") as engine:
        assert isinstance(engine, OnnxRuntimeDenoiser) and isinstance(engine, FixedShapeDenoiser)
        assert engine.images_per_run == 1 and str(engine.shapes) == "3x8x12"
        two = engine({k: v[:2] for k, v in inputs.items()})  # padded to the engine's 3 rows, cut back
        three = engine(inputs)
    assert two.shape[0] == 2
    assert_close(two, three[:2], rel=1e-5, what="padded vs full batch")
    assert engine.closed and engine.session is None
    with pytest.raises(RuntimeError, match="OnnxRuntimeDenoiser is closed"):
        engine(inputs)


@pytest.mark.parametrize("damage", ["garbage", "truncated"])
def test_corrupted_onnx_is_one_clear_error(exports, tmp_path, damage):
    import shutil

    folder = tmp_path / "broken"
    shutil.copytree(exports(2.0), folder)
    path = folder / "denoiser.onnx"
    data = path.read_bytes()
    path.write_bytes(b"not an onnx model at all" if damage == "garbage" else data[: len(data) // 3])
    with pytest.raises(ValueError, match="cannot load ONNX model"):
        OnnxRuntimeDenoiser(folder)


def test_cli_errors_are_one_line(exports, sdxl_dir, tmp_path, capsys):
    folder = tmp_path / "junk"
    folder.mkdir()
    assert (
        main(
            [
                "generate",
                "--model",
                str(sdxl_dir),
                "--engine",
                f"onnx:{folder}",
                "--out",
                str(tmp_path / "x.png"),
            ]
        )
        == 2
    )
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "is not a seg-rt export folder" in err[0]
    (folder / "seg_rt.json").write_text("{bad json")
    assert main(["export", "trt", "--onnx", str(folder), "--out", str(tmp_path / "t"), "--check-only"]) == 2
    assert "is not a seg-rt artifact description" in capsys.readouterr().err
    assert (
        main(
            [
                "export",
                "onnx",
                "--model",
                str(sdxl_dir),
                "--height",
                "60",
                "--width",
                "64",
                "--out",
                str(tmp_path / "e"),
            ]
        )
        == 2
    )
    assert "height must be a positive multiple of 8, got 60" in capsys.readouterr().err
    assert not (tmp_path / "e").exists()


def test_onnxruntime_missing_is_a_clear_error(exports, monkeypatch):
    monkeypatch.setitem(sys.modules, "onnxruntime", None)
    with pytest.raises(ImportError, match=r"onnxruntime is not installed .*pip install 'seg-rt\[onnx\]'"):
        OnnxRuntimeDenoiser(exports(2.0))


def test_unavailable_provider_is_an_error_not_a_fallback(exports):
    with pytest.raises(ValueError, match="CUDAExecutionProvider not available here"):
        OnnxRuntimeDenoiser(exports(2.0), providers=["CUDAExecutionProvider"])


def test_tensorrt_checks_and_sidecar_round_trip(exports, tmp_path, monkeypatch):
    import dataclasses

    from seg_rt.export.tensorrt import build_engine

    info = read_info(exports(math.inf))
    trt_info = dataclasses.replace(info, kind="tensorrt", file="denoiser.plan", extra={"precision": "fp16"})
    again = ArtifactInfo.from_json(trt_info.to_json())
    assert again == trt_info and again.sigma == math.inf
    assert sum(op_counts(exports(2.0) / "denoiser.onnx").values()) > 100
    monkeypatch.setitem(sys.modules, "tensorrt", None)
    with pytest.raises(ImportError, match=r"tensorrt is not installed .*seg-rt\[gpu\]"):
        build_engine(exports(2.0), tmp_path / "engine")
    assert not (tmp_path / "engine").exists()


def _has_tensorrt_gpu() -> bool:
    try:
        import tensorrt  # noqa: F401
    except ImportError:
        return False
    return torch.cuda.is_available()


@pytest.mark.skipif(
    not _has_tensorrt_gpu(), reason="needs TensorRT and an NVIDIA GPU (not on CI / dev machines)"
)
def test_tensorrt_engine_matches_onnx_runtime(exports, sdxl, tmp_path):
    from seg_rt.engines.tensorrt import TensorRTDenoiser
    from seg_rt.export.tensorrt import build_engine

    folder = build_engine(exports(None), tmp_path / "trt", precision="fp32")
    with TensorRTDenoiser(folder) as trt_engine, OnnxRuntimeDenoiser(exports(2.0)) as ort_engine:
        trt_engine.configure(2.0, ["mid"])
        inputs = {k: v.cuda() for k, v in engine_inputs(sdxl).items()}
        assert_close(
            trt_engine(inputs).cpu(), ort_engine(engine_inputs(sdxl)), rel=1e-3, what="TensorRT vs ORT"
        )


def test_fp16_export_loads_validates_and_samples(sdxl, tmp_path):
    """fp16 graphs must be valid ONNX (no mixed-precision Concat) and sample close to fp32 torch."""
    result = export_onnx(sdxl, tmp_path / "fp16", height=H, width=W, sigma=None, fp16=True)
    assert "skipped" not in result.validation and result.validation["max_abs_error"] < 1e-2
    assert result.info.dtype == "float16"
    kw = {"steps": 3, "height": H, "width": W, "seg_sigma": 2.0, "output_type": "np"}
    ours = seg_rt.generate(sdxl, "a", **kw)
    half = seg_rt.generate(sdxl, "a", engine=f"onnx:{result.folder}", **kw)
    assert np.abs(ours - half).max() < 0.05
