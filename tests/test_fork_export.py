"""The shared-prefix fork inside the exported graph (``seg-rt export onnx --fork``), layout as data.

One fork engine per model serves every row layout the sampler builds; each must equal the PyTorch
shared-prefix path (``TorchDenoiser`` / ``DiTDenoiser(shared_prefix=True)``), an independent code path,
within the export's scale-relative bound.
"""

import json

import pytest
import torch

from seg_rt.artifacts import read_info
from seg_rt.engines.onnxruntime import OnnxRuntimeDenoiser
from seg_rt.export import export_onnx
from seg_rt.families import family_of
from seg_rt.sampler import DenoiserBatch, RowLayout, build_batch

from .tolerance import assert_close

pytestmark = pytest.mark.slow

SIZES = {"sd15": (64, 64), "sdxl": (64, 96), "sd3": (48, 80), "flux": (48, 80)}

# every layout the sampler builds for one image (sampler.branches_at, sequential=True)
LAYOUTS = {
    "cfg_seg": [("uncond", "cond", "seg")],  # PAG rows have this layout too (perturbation aside)
    "seg_no_cfg": [("cond", "seg")],
    "outside_window": [("uncond", "cond")],
    "uncond_placement": [("seg_uncond", "cond")],
    "sequential": [("uncond",), ("cond",), ("seg",)],
}


@pytest.fixture(scope="module", params=["sd15", "sdxl", "sd3", "flux"])
def pipe(request):
    from seg_rt.tiny import tiny_dit_pipeline, tiny_pipeline

    name = request.param
    return name, tiny_pipeline(name) if name in ("sd15", "sdxl") else tiny_dit_pipeline(name)


@pytest.fixture(scope="module")
def fork_exports(pipe, tmp_path_factory):
    """sigma (2.0 baked, None runtime) -> fork export of ``pipe``, batch 1, CFG layout."""
    name, p = pipe
    made = {}

    def get(sigma):
        if sigma not in made:
            h, w = SIZES[name]
            out = tmp_path_factory.mktemp(f"{name}fork") / "engine"
            made[sigma] = export_onnx(p, out, height=h, width=w, sigma=sigma, fork=True)
        return made[sigma]

    return get


def _torch_denoiser(name, p):
    if name in ("sd15", "sdxl"):
        from seg_rt.engines import TorchDenoiser

        return TorchDenoiser(p.unet, sigma=2.0, shared_prefix=True)
    from seg_rt.engines.dit_denoiser import DiTDenoiser

    return DiTDenoiser(p.transformer, family_of(p), sigma=2.0, shared_prefix=True)


def _branch_inputs(name, p, seed=3):
    """(x, t, cond, uncond) for one image, from the family's export inputs (2 rows: uncond, cond)."""
    h, w = SIZES[name]
    family = family_of(p)
    probe = family.export_model(p, sigma=2.0, layers=("mid",))
    try:
        inputs = family.export_inputs(p, probe, 2, 1, h, w, torch.float32, seed=seed)
    finally:
        probe.remove()
    per_row = {k: v for k, v in inputs.items() if k not in ("sample", "timestep", "seg_mask")}
    uncond = {k: v[:1] for k, v in per_row.items()}
    cond = {k: v[1:] for k, v in per_row.items()}
    return inputs["sample"][1:], torch.tensor(500.0), cond, uncond


@pytest.mark.parametrize("sigma", [2.0, None], ids=["baked", "runtime"])
def test_fork_engine_equals_the_pytorch_shared_prefix_for_every_layout(pipe, fork_exports, sigma):
    name, p = pipe
    result = fork_exports(sigma)
    info = result.info
    assert info.prefix_rows == 2 and info.fork_rows == 1 and info.rows == 3
    assert info.fork_block == {"sd15": "mid_block", "sdxl": "mid_block"}.get(name, info.fork_block)
    assert info.fork_block.startswith("transformer_blocks.") or name in ("sd15", "sdxl")
    x, t, cond, uncond = _branch_inputs(name, p)
    engine = OnnxRuntimeDenoiser(result.folder)
    engine.configure(2.0)
    ran = _count_runs(engine)
    try:
        with _torch_denoiser(name, p) as ref:
            for layout, calls in LAYOUTS.items():
                for branches in calls:
                    batch = build_batch(list(branches), x, t, cond, uncond)
                    ran.clear()
                    ours, want = engine(batch), ref(batch)
                    assert ours.shape == want.shape
                    assert_close(ours, want, rel=1e-4, what=f"{name} {layout} {branches}")
                    # a batch with a row to fork runs the fork graph, any other the unforked twin
                    forks = branches[-1] == "seg" and len(branches) > 1
                    assert ran == (["fork"] if forks else ["twin"]), (layout, branches, ran)
            # the perturbed row really differs from the cond row it was forked from
            batch = build_batch(["uncond", "cond", "seg"], x, t, cond, uncond)
            out = engine(batch)
            assert (out[2] - out[1]).abs().max() > 1e-3
    finally:
        engine.close()


def _count_runs(engine) -> list[str]:
    """Which graph each call of ``engine`` ran: "fork" (its own session) or "twin"."""
    ran: list[str] = []
    for what, e in (("fork", engine), ("twin", engine.twin)):
        run = e._run
        e._run = lambda feed, run=run, what=what: ran.append(what) or run(feed)
    return ran


def test_fork_graph_gathers_fork_source_and_passes_the_tensorrt_check(pipe, fork_exports):
    import onnx

    from seg_rt.export.tensorrt import check_onnx_for_tensorrt

    folder = fork_exports(2.0).folder
    model = onnx.load(str(folder / "denoiser.onnx"), load_external_data=False)
    shapes = {i.name: [d.dim_value for d in i.type.tensor_type.shape.dim] for i in model.graph.input}
    assert shapes["fork_source"] == [1] and shapes["seg_mask"] == [3] and shapes["sample"][0] == 2
    # fork_source feeds a Gather's indices (the exporter may reshape it first): data, not a constant
    derived, gathers = {"fork_source"}, []
    for n in model.graph.node:  # topological order
        if n.op_type == "Gather" and n.input[1] in derived:
            gathers.append(n)
        elif n.op_type in ("Reshape", "Cast", "Identity", "Squeeze", "Unsqueeze") and n.input[0] in derived:
            derived.update(n.output)
    assert gathers
    check_onnx_for_tensorrt(folder)  # raises on an operator TensorRT's parser lacks (the twin's too)
    sidecar = json.loads((folder / "seg_rt.json").read_text())
    assert sidecar["fork_rows"] == 1 and sidecar["prefix_rows"] == 2 and sidecar["fork_block"]
    # the twin: the same model unforked on the two prefix rows
    assert sidecar["twin_file"] == "denoiser_twin.onnx"
    twin = onnx.load(str(folder / "denoiser_twin.onnx"), load_external_data=False)
    shapes = {i.name: [d.dim_value for d in i.type.tensor_type.shape.dim] for i in twin.graph.input}
    assert "fork_source" not in shapes and shapes["seg_mask"] == [2] and shapes["sample"][0] == 2
    assert not any(n.op_type == "Gather" and "fork_source" in n.input for n in twin.graph.node)


@pytest.fixture(scope="module")
def sd15_fork(sd15, tmp_path_factory):
    """A fork export of the tiny SD1.5 (baked σ 2, batch 1, CFG layout)."""
    return export_onnx(
        sd15, tmp_path_factory.mktemp("sd15fork") / "e", height=64, width=64, sigma=2.0, fork=True
    )


def test_fork_export_without_a_twin_runs_the_padded_fork_rows(sd15, tmp_path, capsys):
    """``twin=False`` (``--no-twin``): no twin graph, no ``twin_file``; the fork engine still serves every
    layout, its fork graph computing padding fork rows where no row is perturbed. ``--no-twin`` without
    ``--fork`` is refused in one line before the model loads."""
    from seg_rt.cli import main
    from seg_rt.demo.model import weights_dir

    folder = export_onnx(sd15, tmp_path / "e", height=64, width=64, sigma=2.0, fork=True, twin=False).folder
    assert sorted(p.name for p in folder.iterdir()) == ["denoiser.onnx", "seg_rt.json"]
    assert "twin_file" not in json.loads((folder / "seg_rt.json").read_text())
    x, t, cond, uncond = _branch_inputs("sd15", sd15)
    with OnnxRuntimeDenoiser(folder) as engine, _torch_denoiser("sd15", sd15) as ref:
        assert engine.twin is None
        for branches in (("uncond", "cond"), ("seg_uncond", "cond"), ("uncond", "cond", "seg")):
            batch = build_batch(list(branches), x, t, cond, uncond)
            assert_close(engine(batch), ref(batch), rel=1e-4, what=f"no twin {branches}")
    rc = main(["export", "onnx", "--model", str(weights_dir()), "--height", "64", "--width", "64",
               "--no-twin", "--out", str(tmp_path / "cli")])  # fmt: skip
    err = capsys.readouterr().err
    assert (
        rc == 2 and "--no-twin applies to --fork exports only" in err and len(err.strip().splitlines()) == 1
    )
    assert not (tmp_path / "cli").exists()


def test_fork_engine_refuses_a_layout_it_cannot_serve(sd15, sd15_fork):
    folder = sd15_fork.folder
    x, t, cond, uncond = _branch_inputs("sd15", sd15)
    two = {k: torch.cat([v, v]) for k, v in cond.items()}
    two_u = {k: torch.cat([v, v]) for k, v in uncond.items()}
    batch = build_batch(["uncond", "cond", "seg"], torch.cat([x, x]), t, two, two_u)
    with OnnxRuntimeDenoiser(folder) as engine:
        with pytest.raises(
            ValueError, match=r"engine accepts batch x latent height x width = 3x8x8, got 6x8x8"
        ) as e:
            engine(batch)
        assert "\n" not in str(e.value)
        plain = dict(build_batch(["uncond", "cond", "seg"], x, t, cond, uncond))  # no host layout
        with pytest.raises(ValueError, match=r"got 3 \+ 0"):
            engine(plain)
        # a layout whose perturbed rows are not last: all prefix rows, too many
        odd = DenoiserBatch(plain, RowLayout(slice(0, 1), slice(1, 2)))
        with pytest.raises(ValueError, match="fork engine serves"):
            engine(odd)


def test_fork_export_refuses_seg_layers_in_the_first_block(sd15, tmp_path):
    with pytest.raises(ValueError, match=r"first block \(down_blocks.0\), so no prefix is shared"):
        export_onnx(sd15, tmp_path / "e", height=64, width=64, layers=("down",), fork=True)
    assert not (tmp_path / "e").exists()


def test_unforked_sidecar_keeps_its_keys(sd15, tmp_path):
    """An export without --fork writes no fork keys (older sidecars read as before) and serves as before."""
    result = export_onnx(sd15, tmp_path / "plain", height=64, width=64, sigma=2.0)
    sidecar = json.loads((result.folder / "seg_rt.json").read_text())
    assert not {"fork_block", "prefix_rows", "fork_rows"} & set(sidecar)
    assert read_info(result.folder).fork_rows is None
    x, t, cond, uncond = _branch_inputs("sd15", sd15)
    batch = build_batch(["uncond", "cond", "seg"], x, t, cond, uncond)
    with OnnxRuntimeDenoiser(result.folder) as engine, _torch_denoiser("sd15", sd15) as ref:
        assert_close(engine(batch), ref(batch), rel=1e-4, what="unforked engine")


def test_sampling_with_the_fork_engine_equals_torch(pipe, fork_exports):
    """``engine="onnx:DIR"`` on a fork export through the sampler: SEG steps fork, the steps outside
    the SEG window run the prefix rows (padding fork row), and the latents match torch's."""
    import seg_rt

    name, p = pipe
    h, w = SIZES[name]
    kw = {"steps": 3, "height": h, "width": w, "seg_sigma": 2.0, "seg_end": 0.5, "output_type": "latent"}
    ours = seg_rt.generate(p, "a red fox", **kw)
    onnx = seg_rt.generate(p, "a red fox", engine=f"onnx:{fork_exports(2.0).folder}", **kw)
    assert_close(onnx, ours, rel=1e-4, what=f"{name} fork engine vs torch latents")
