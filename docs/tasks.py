"""Writes docs/tasks.png: img2img and inpainting with SEG on the bundled demo model (README, "Tasks").

    .venv/bin/python docs/tasks.py

An init image sampled from the demo model; img2img re-runs part of its schedule under another prompt
(the composition stays); inpainting repaints the masked right half only (the left half stays, pixel
for pixel: the known region is blended back every step).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

import seg_rt
from seg_rt.cli.common import demo_model
from seg_rt.images import grid
from seg_rt.pipeline import load_pipeline

OUT = Path(__file__).with_name("tasks.png")


def main() -> None:
    model = load_pipeline(demo_model(), "cpu")
    common = {"cfg": 3.0, "seg_scale": 1.0, "steps": 12}
    init = seg_rt.generate(model, "yellow star on checks", seed=4, **common)[0]
    mask = np.zeros((32, 32), np.uint8)
    mask[:, 16:] = 255  # repaint the right half
    img2img = [
        seg_rt.generate(model, "red star on checks", image=init, strength=s, seed=5, **common)[0]
        for s in (0.5, 0.8)
    ]
    inpaint = seg_rt.generate(model, "blue ring on dots", image=init, mask=mask, seed=5, **common)[0]
    shown_mask = Image.fromarray(mask).convert("RGB")
    labels = [
        "init: yellow star\non checks",
        "img2img 0.5:\nred star on checks",
        "img2img 0.8:\nred star on checks",
        "mask (white =\nrepaint)",
        "inpaint: blue\nring on dots",
    ]
    grid([init, *img2img, shown_mask, inpaint], labels).save(OUT)
    kept = np.asarray(inpaint)[:, :16].astype(int) - np.asarray(init)[:, :16].astype(int)
    print(OUT, "inpainting changed the kept half by at most", np.abs(kept).max(), "levels")


if __name__ == "__main__":
    main()
