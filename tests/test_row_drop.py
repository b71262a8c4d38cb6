"""Dropping rows mid-run (a cancelled request frees its batch slot): the rows that stay are
bit-equal to their solo runs, for a stateless and for multistep / ancestral schedulers."""

import pytest
import torch

from seg_rt.params import GenerationParams
from seg_rt.pipeline import run_params


@pytest.mark.parametrize("scheduler", ["euler", "dpmpp_2m", "euler_a", "unipc"])
def test_rows_left_after_a_drop_equal_their_solo_runs(sdxl, scheduler):
    base = GenerationParams(steps=4, height=64, width=64, scheduler=scheduler)
    rows = [base.replace(prompt=p, seed=s) for p, s in (("a cat", 1), ("a dog", 2), ("a cow", 3))]
    seen = []

    def drop_middle(step, t, latents):
        seen.append(latents.shape[0])
        return [1] if step == 1 else None  # after step 1, row 1 ("a dog") leaves the run

    with torch.inference_mode():
        both = run_params(sdxl, rows, output_type="latent", callback=drop_middle)
        solo = [run_params(sdxl, [p], output_type="latent") for p in (rows[0], rows[2])]
    assert seen == [3, 3, 2, 2]  # the run went on with two rows
    assert both.shape[0] == 2
    for got, (ref,) in zip(both, solo, strict=True):
        assert torch.equal(got, ref)  # the same code path: bit-equal


def test_dropping_every_row_ends_the_run(sdxl):
    rows = [GenerationParams(steps=4, height=64, width=64, seed=s) for s in (1, 2)]
    calls = []

    def drop_all(step, t, latents):
        calls.append(step)
        return [0, 1]

    with torch.inference_mode():
        out = run_params(sdxl, rows, output_type="latent", callback=drop_all)
    assert calls == [0] and out.shape[0] == 0


def test_a_dropped_inpainting_row_takes_its_blend_and_guidance_state_with_it():
    """Inpainting's known-region blend and APG's momentum are per row: after a drop, the rows left
    still equal their solo runs (the blend and the memory are cut with the latents)."""
    import numpy as np

    from seg_rt.demo.model import weights_dir
    from seg_rt.pipeline import load_pipeline
    from seg_rt.tasks import load_image

    pipe = load_pipeline(str(weights_dir()), "cpu")
    rng = np.random.default_rng(0)
    mask = np.zeros((32, 32), dtype=np.uint8)
    mask[:, 16:] = 255
    base = GenerationParams(
        steps=4,
        strength=0.75,
        init_image=load_image(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)),
        mask=load_image(mask, "mask", mode="L"),
        guidance="apg",
    )
    rows = [base.replace(prompt=p, seed=s) for p, s in (("red star", 1), ("blue dots", 2), ("green cube", 3))]
    with torch.inference_mode():
        both = run_params(pipe, rows, output_type="latent", callback=lambda i, t, x: [1] if i == 1 else None)
        solo = [run_params(pipe, [p], output_type="latent") for p in (rows[0], rows[2])]
    assert both.shape[0] == 2
    for got, (ref,) in zip(both, solo, strict=True):
        assert torch.equal(got, ref)
