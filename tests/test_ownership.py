"""Whoever patches a shared model owns the patch (docs/design.md, "Who owns a patch"): a second SEG
patch on a layer is an error, batch-invariance swaps are reference-counted, the runtime blur
matrices are scoped, and every restore is exact (the very original processor objects and classes)."""

import math

import pytest
import torch
from diffusers.models.attention_processor import Attention
from torch import nn

import seg_rt
from seg_rt.attention import SEGAttention, SEGProcessor
from seg_rt.blur import blur_matrix
from seg_rt.denoiser import RowwiseConv2d, RowwiseLinear, SEGUNet, batch_invariant
from seg_rt.errors import SEGAlreadyInstalled
from seg_rt.layers import self_attention_layers


def _processors(unet):
    return {n: m.processor for n, m in self_attention_layers(unet).items()}


def _classes(*models):
    return {(i, n): type(m) for i, model in enumerate(models) for n, m in model.named_modules()}


def _hooks(model):
    return sum(len(m._forward_pre_hooks) for m in model.modules())


def test_second_patch_on_a_layer_is_an_error_and_nothing_is_half_installed(sd15):
    unet = sd15.unet
    originals = _processors(unet)
    first = SEGAttention(unet, 2.0, ["mid"]).install()
    hooks = _hooks(unet)
    # "down" comes before "mid" in module order: a check per layer while installing would have
    # replaced the down layers' processors before failing on mid
    second = SEGAttention(unet, 1.0, ["down", "mid"])
    mid = next(n for n in second.layer_names if n.startswith("mid_block"))
    with pytest.raises(SEGAlreadyInstalled, match=f"SEG is already installed on layer {mid} ") as err:
        second.install()
    assert isinstance(err.value, ValueError) and "\n" not in str(err.value)
    assert not second.installed and _hooks(unet) == hooks
    down = [n for n in second.layer_names if n.startswith("down_blocks")]
    assert down and all(_processors(unet)[n] is originals[n] for n in down)

    first.remove()
    assert _processors(unet) == originals  # nothing of the failed install left behind
    with second:  # once the first patch is gone the second installs
        assert {type(_processors(unet)[n]).__name__ for n in second.layer_names} == {"SEGAttnProcessor"}
    current = _processors(unet)
    assert all(current[n] is originals[n] for n in originals)  # the very original objects
    assert _hooks(unet) == 0


def test_second_denoiser_on_the_same_layers_is_refused_without_touching_the_first(sd15):
    unet = sd15.unet
    classes, originals = _classes(unet), _processors(unet)
    first = SEGUNet(unet, sigma=2.0, layers=("mid",))
    swapped = _classes(unet)
    with pytest.raises(SEGAlreadyInstalled, match="mid_block"):
        SEGUNet(unet, sigma=1.0, layers=("mid",))
    assert _classes(unet) == swapped  # the refused one swapped nothing and released nothing
    first.remove()
    assert _classes(unet) == classes
    assert all(_processors(unet)[n] is originals[n] for n in originals)


def test_batch_invariance_is_kept_until_the_last_holder_releases(sdxl):
    unet = sdxl.unet
    before = _classes(unet)
    linears = [n for n, m in unet.named_modules() if type(m) is nn.Linear]
    assert linears
    outer = batch_invariant(unet).acquire()
    with batch_invariant(unet, None):  # None roots are skipped (SEGUNet without a ControlNet)
        assert all(type(unet.get_submodule(n)) is RowwiseLinear for n in linears)
    # the inner holder's release left the outer's swap in place
    assert all(type(unet.get_submodule(n)) is RowwiseLinear for n in linears)
    outer.release()
    assert _classes(unet) == before
    outer.release()  # releasing twice is allowed and changes nothing
    assert _classes(unet) == before


def test_a_holder_acquires_once(sd15):
    holder = batch_invariant(sd15.unet).acquire()
    try:
        with pytest.raises(RuntimeError, match="already acquired"):
            holder.acquire()
    finally:
        holder.release()
    assert not any(type(m) is RowwiseLinear for m in sd15.unet.modules())


def test_two_users_of_one_unet_closing_in_either_order(sdxl):
    """A SEG denoiser on ``up.0`` stays live while one on ``mid`` closes and ``generate`` opens and
    closes its own: the swap stays until the last holder goes, batched images still equal solo ones
    bit for bit, and the last release restores every class."""
    unet = sdxl.unet
    before = _classes(unet)
    rowwise = [n for n, m in unet.named_modules() if type(m) is nn.Linear]
    first = SEGUNet(unet, sigma=2.0, layers=("mid",))
    second = SEGUNet(unet, sigma=2.0, layers=("up.0",))
    first.remove()
    assert all(type(unet.get_submodule(n)) is RowwiseLinear for n in rowwise)
    kw = {"steps": 2, "height": 64, "width": 64, "seg_sigma": 2.0, "output_type": "latent"}
    batch = torch.as_tensor(seg_rt.generate(sdxl, "a dog", seed=3, num_images=2, **kw))
    for i in range(2):
        alone = torch.as_tensor(seg_rt.generate(sdxl, "a dog", seed=3 + i, **kw))
        assert torch.equal(batch[i], alone[0])
    # generate's denoiser (SEG on mid) released its hold; the live one on up.0 keeps the swap
    assert all(type(unet.get_submodule(n)) is RowwiseLinear for n in rowwise)
    second.remove()
    assert _classes(unet) == before


def test_swaps_match_exact_types_and_restore_the_original_class():
    class MyLinear(nn.Linear):  # a subclass is somebody else's layer: never swapped
        pass

    model = nn.Sequential(nn.Linear(4, 4), MyLinear(4, 4), nn.Conv2d(3, 5, 3), nn.Conv3d(2, 2, 1))
    before = _classes(model)
    with batch_invariant(model):
        assert [type(m) for m in model] == [RowwiseLinear, MyLinear, nn.Conv2d, type(model[3])]
        assert type(model[3]).__name__ == "RowwiseConv3d"
    assert _classes(model) == before


def test_rowwise_conv2d_gives_each_row_its_solo_result():
    torch.manual_seed(0)
    conv = nn.Conv2d(4, 8, 2, stride=2)
    x = torch.randn(5, 4, 8, 8)
    with torch.no_grad():
        solo = [conv(x[i : i + 1])[0] for i in range(5)]  # plain Conv2d, one sample at a time
        with batch_invariant(conv, swaps={nn.Conv2d: RowwiseConv2d}):
            assert type(conv) is RowwiseConv2d
            batched = conv(x)
    assert type(conv) is nn.Conv2d
    assert all(torch.equal(batched[i], solo[i]) for i in range(5))


def _one_layer(sigma: float):
    torch.manual_seed(0)
    holder = nn.Module()
    holder.attn1 = Attention(query_dim=16, heads=2, dim_head=8).eval()
    seg = SEGAttention(holder, sigma, ["attn1"]).install()
    seg.processors["attn1"].grid = (3, 4)
    return holder.attn1, seg


def test_runtime_blur_is_scoped_and_always_restored():
    attn, seg = _one_layer(1.0)
    x = torch.randn(2, 12, 16)
    mask = torch.tensor([False, True])

    def run():
        seg.set_mask(mask)
        with torch.no_grad():
            return attn(x)

    at_1 = run()
    sigma_2 = {n: blur_matrix(n, 2.0) for n in (3, 4)}
    with seg.runtime_blur(sigma_2) as same:
        assert same is seg and seg.runtime_matrices.keys() == {3, 4}
        at_2 = run()
        with seg.runtime_blur(None):  # nested: σ's own matrices inside, the outer ones after
            assert seg.runtime_matrices is None
            assert torch.equal(run(), at_1)
        assert seg.runtime_matrices.keys() == {3, 4}
    assert seg.runtime_matrices is None
    assert torch.equal(run(), at_1)
    with pytest.raises(KeyError), seg.runtime_blur(sigma_2):
        raise KeyError("boom")
    assert seg.runtime_matrices is None

    # independent: a layer whose σ is 2 computes the same numbers from σ itself
    attn_2, seg_2 = _one_layer(2.0)
    seg_2.set_mask(mask)
    with torch.no_grad():
        ref = attn_2(x)
    assert torch.equal(at_2, ref)
    assert (at_2 - at_1)[1].abs().max() > 1e-4  # and σ really changed the perturbed row
    seg.remove()
    seg_2.remove()


def test_runtime_blur_set_and_clear_pair_checks_shapes():
    _, seg = _one_layer(1.0)
    with pytest.raises(ValueError, match=r"runtime blur matrix for axis length 4 must be 4x4, got \[3, 3\]"):
        seg.set_runtime_blur({4: torch.eye(3)})
    assert seg.runtime_matrices is None
    seg.set_runtime_blur({3: torch.eye(3)})
    assert seg.runtime_matrices.keys() == {3}
    seg.clear_runtime_blur()
    assert seg.runtime_matrices is None
    seg.remove()


@pytest.mark.parametrize("sigma, shown", [(-1.0, "-1"), (0.0, "0"), (math.nan, "nan")])
def test_sigma_rule_is_the_config_one_everywhere(sd15, tmp_path, sigma, shown):
    from seg_rt.config import check_sigma
    from seg_rt.export.onnx import export_onnx

    message = f"seg sigma must be > 0 or inf, got {shown}"
    for check in (
        lambda: check_sigma(sigma),
        lambda: SEGAttention(sd15.unet, sigma, ["mid"]),
        lambda: export_onnx(sd15, tmp_path / "x", height=64, width=64, sigma=sigma),
    ):
        with pytest.raises(ValueError, match=message):
            check()
    assert not (tmp_path / "x").exists()
    with pytest.raises(ValueError, match="seg sigma must be a number, got '2'"):
        SEGAttention(sd15.unet, "2", ["mid"])


def test_configure_refuses_a_bad_sigma_before_changing_anything(sd15):
    from seg_rt.engines import TorchDenoiser

    with TorchDenoiser(sd15.unet, sigma=2.0, layers=("mid",)) as den:
        seg = den.model.seg
        with pytest.raises(ValueError, match="seg sigma must be > 0 or inf, got -3"):
            den.configure(-3.0, ["up.0"])
        assert den.model.seg is seg and seg.installed and seg.sigma == 2.0 and den.layers == ("mid",)
        den.configure(math.inf)
        assert seg.sigma == math.inf


def test_configure_with_layers_that_do_not_exist_keeps_the_current_ones(sd15):
    """A long-lived denoiser (a job worker's, a serving replica's) survives one bad request: the
    same outputs afterwards as a denoiser that never saw it."""
    from seg_rt.engines import TorchDenoiser

    kw = {"steps": 2, "height": 64, "width": 64, "seed": 1, "output_type": "latent", "seg_sigma": 2.0}
    with TorchDenoiser(sd15.unet, sigma=2.0, layers=("mid",)) as den:
        with pytest.raises(ValueError, match="matches no self-attention layer"):
            den.configure(2.0, ["nowhere"])
        assert den.layers == ("mid",) and den.model.seg.installed
        after = seg_rt.generate(sd15, "a", engine=den, **kw)
    assert torch.equal(after, seg_rt.generate(sd15, "a", **kw))
    assert not any(isinstance(p, SEGProcessor) for p in _processors(sd15.unet).values())  # restored


def test_decode_restores_a_float16_vae_after_its_upcast():
    """SDXL's VAE upcasts from float16 to decode (its config's force_upcast, as diffusers does) and
    is float16 again afterwards: decoding never changes a shared pipeline's dtypes."""
    from seg_rt.families import family_of
    from seg_rt.tiny import tiny_pipeline

    pipe = tiny_pipeline("sdxl")
    pipe.vae.to(torch.float16)
    pipe.vae.register_to_config(force_upcast=True)
    latents = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    images = family_of(pipe).decode(pipe, latents, "np")
    assert images.shape == (1, 64, 64, 3)
    assert pipe.vae.dtype == torch.float16 and all(p.dtype == torch.float16 for p in pipe.vae.parameters())
