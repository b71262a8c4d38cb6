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
