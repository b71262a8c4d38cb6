"""``seg-rt bench guidance``: each guidance method against CFG at matched compute.

For each model (the bundled demo model and the MNIST digits model, each at its final and its weak,
early-step checkpoint) and each case:

- ``unconditional``: empty prompts, no CFG (SEG's headline setting). The rival is vanilla sampling
  given the same forward passes (more steps); CFG does not exist here (its two rows are equal).
- ``no-cfg``: prompts, the method alone (cfg 1). The rival is CFG at the same forward passes per
  image and at the CFG scale whose distance to vanilla matches the method's.
- ``conditional``: prompts, the method on top of CFG at ``cfg``. The rival is CFG alone with the
  same forward passes per image (more steps) at the matched effective scale.

Every row carries ``method``, ``nfe`` (denoiser forward passes per image, counted on the UNet,
not assumed), ``effective_strength`` (the matched CFG scale; None where CFG does not exist) and
the rival's metrics at that point (linear interpolation between the two CFG sweep scales that
bracket the method's distance to vanilla; ``beyond_sweep`` when it lies outside the sweep).
Metrics: FID, precision / recall, diversity, prompt accuracy (the model's classifier), distance
to vanilla (same seeds, same steps, no guidance), in the classifier's feature space
(``seg_rt.bench.quality``).

Methods are named in ``METHODS`` (name → the request settings at a scale and σ); a new guidance
method plugs in with one entry there.
"""

from __future__ import annotations

import itertools
import json
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from seg_rt.config import parse_sigma, sigma_label, sigma_to_json

from .quality import score, to_classifier_input


# -- methods: name -> settings -----------------------------------------------------------------
@dataclass(frozen=True)
class Guidance:
    """How a method runs at ``(scale, sigma, cfg, size)`` (``size``: the latent's height, for
    settings that scale with it): ``generate_batch`` settings and the denoiser's perturbation
    (``TorchDenoiser``'s: ``blur`` for SEG, ``identity`` PAG, ``shuffle`` TPG, ``skip`` SLG).

    ``modifier``: the method changes how CFG's delta combines (APG, CFG-Zero*, FreSca): its scale is
    CFG's, it adds no forward pass, and it runs in the conditional case only, over
    ``modifier_scales`` (without prompts its delta is zero). ``flow_only``: defined for
    flow-matching models only; on another model the bench writes a ``skipped`` row saying so."""

    settings: Callable[[float, float, float, int], dict]
    perturbation: str = "blur"
    uses_sigma: bool = False
    needs_cfg: bool = False  # only on top of CFG (the conditional case)
    modifier: bool = False
    flow_only: bool = False


def _seg(extra: dict | None = None) -> Callable[[float, float, float, int], dict]:
    return lambda s, sigma, cfg, size: {"cfg": cfg, "seg_scale": s, "seg_sigma": sigma, **(extra or {})}


def _perturbed(term: str, options: str = "") -> Callable[[float, float, float, int], dict]:
    """A perturbed term of the guidance list (PAG, TPG, SLG) at scale ``s``, SEG off."""
    return lambda s, sigma, cfg, size: {"cfg": cfg, "seg_scale": 0.0, "guidance": f"{term}={s:g}{options}"}


def _modifier(spec: Callable[[int], str]) -> Callable[[float, float, float, int], dict]:
    """A modifier of the CFG delta at CFG scale ``s`` (the guidance list's ``spec(size)``), SEG off."""
    return lambda s, sigma, cfg, size: {"cfg": s, "seg_scale": 0.0, "guidance": spec(size)}


def fresca_cutoff(size: int) -> int:
    """FreSca's default cutoff (20 frequencies of SDXL's 128-wide latent) at a ``size``-wide latent:
    at the default the whole spectrum of a 16- or 32-wide latent is "low" and FreSca is CFG."""
    return max(1, round(20 * size / 128))


METHODS: dict[str, Guidance] = {
    "seg": Guidance(_seg(), uses_sigma=True),
    # PAG's perturbation as the SEG rows' identity perturbation (the guidance list's ``pag`` term
    # computes the same; kept as it was for the rows already measured)
    "pag": Guidance(lambda s, sigma, cfg, size: {"cfg": cfg, "seg_scale": s}, perturbation="identity"),
    # TPG (arXiv 2506.10036): the block input's tokens shuffled; paper / node default scale 3
    "tpg": Guidance(_perturbed("tpg"), perturbation="shuffle"),
    # SLG (SD3.5 reference, diffusers' SkipLayerGuidance): attention skipped, default window
    # 0.01-0.2 of the schedule (few steps: 1 perturbed pass in a 6-step run, none in 4); default
    # scale 2.8. ``slg-full``: every step (STG's way), the NFE of SEG / PAG / TPG
    "slg": Guidance(_perturbed("slg"), perturbation="skip"),
    "slg-full": Guidance(_perturbed("slg", ":start=0:end=1"), perturbation="skip"),
    # modifiers of the CFG delta at their papers' defaults, at CFG scale ``s``
    "apg": Guidance(_modifier(lambda size: "apg"), modifier=True),
    "cfgzero": Guidance(_modifier(lambda size: "cfgzero"), modifier=True, flow_only=True),
    "fresca": Guidance(_modifier(lambda size: "fresca"), modifier=True),
    "fresca-scaled": Guidance(_modifier(lambda size: f"fresca:cutoff={fresca_cutoff(size)}"), modifier=True),
    # the cheap SEG modes (SEGConfig): the delta of every 2nd step reused; SEG on the first half
    # (at SEGConfig's default σ, as in ``bench quality``)
    "seg-every2": Guidance(_seg({"seg_every": 2})),
    "seg-window": Guidance(_seg({"seg_start": 0.0, "seg_end": 0.5})),
    # the blur inside CFG's unconditional row: no extra row, the strength is CFG's scale
    "seg-uncond": Guidance(
        lambda s, sigma, cfg, size: {
            "cfg": cfg,
            "seg_scale": 1.0,
            "seg_sigma": sigma,
            "seg_placement": "uncond",
        },
        needs_cfg=True,
    ),
}
VANILLA = {"cfg": 1.0, "seg_scale": 0.0}  # seg_scale explicitly: the request's default is SEG on
CASES = ("unconditional", "no-cfg", "conditional")
SIGMAS = (1.0, 2.0, 5.0, 10.0, math.inf)  # SEG's claim: the unconditional grid
CASE_SIGMAS = (10.0, math.inf)  # σ of the SEG rows in the prompt cases
SCALES = (1.0, 2.0, 3.0)
CFG_SCALES = (1.5, 2.0, 3.0, 5.0)  # the CFG sweep the effective strength is read from
MODIFIER_SCALES = (2.0, 3.0, 5.0)  # the CFG scales the modifiers (APG, CFG-Zero*, FreSca) run at
DEFAULT_METHODS = (
    "seg",
    "pag",
    "tpg",
    "slg",
    "slg-full",
    "apg",
    "cfgzero",
    "fresca",
    "fresca-scaled",
    "seg-uncond",
)


def check_methods(names: Sequence[str]) -> list[str]:
    bad = [n for n in names if n not in METHODS]
    if bad:
        raise ValueError(f"unknown guidance method {bad[0]!r}; known: {', '.join(METHODS)}")
    return list(names)


# -- models: the bundled ones --------------------------------------------------------------------
@dataclass(frozen=True)
class Subject:
    """A model to evaluate: its folder, its classifier and its real data."""

    name: str
    folder: Path
    classifier: Callable[[], torch.nn.Module]
    real: Callable[[int], tuple[torch.Tensor, torch.Tensor, list[str]]]  # n -> (x, labels, prompts)
    label_head: str


def _digits_real(n: int):
    from seg_rt.demo import digits

    x, y = digits.heldout("eval")
    if n > len(x):
        raise ValueError(f"--samples {n}: the digits evaluation set has {len(x)} images")
    return digits.to_pixels(x[:n]), y[:n], [digits.caption(int(d)) for d in y[:n]]


def _demo_real(n: int):
    from seg_rt.demo import data

    from .quality import BENCH_SEED_BASE

    x, items = data.batch([BENCH_SEED_BASE + s for s in range(n)])
    return x, torch.tensor([it.shape for it in items]), [it.caption for it in items]


CHECKPOINTS = ("final", "weak")


def subjects(names: Sequence[str], checkpoints: Sequence[str] = CHECKPOINTS) -> list[Subject]:
    """The bundled models by name (``digits``, ``demo``) at the ``checkpoints`` asked for (``final``,
    ``weak``: the early-step export: digits step 100, demo step 200 in ``seg_rt/demo/weights_weak``)."""
    bad = [c for c in checkpoints if c not in CHECKPOINTS]
    if bad or not checkpoints:
        raise ValueError(f"unknown checkpoint {bad[0] if bad else ''!r}; known: final, weak")
    from seg_rt.demo import digits
    from seg_rt.demo.classifier import load_classifier
    from seg_rt.demo.model import weights_dir

    out = []
    for name in names:
        if name == "digits":
            for w in [c == "weak" for c in checkpoints]:
                tag = "digits-weak" if w else "digits"
                out.append(Subject(tag, digits.weights_dir(w), digits.load_classifier, _digits_real, "digit"))
        elif name == "demo":
            if "final" in checkpoints:
                out.append(Subject("demo", weights_dir(), load_classifier, _demo_real, "shape"))
            if "weak" in checkpoints and (weights_dir().parent / "weights_weak").is_dir():
                out.append(Subject("demo-weak", weights_dir().parent / "weights_weak", load_classifier,
                                   _demo_real, "shape"))  # fmt: skip
        else:
            raise ValueError(f"unknown model {name!r}; bundled: digits, demo")
    return out


# -- sampling and scoring -------------------------------------------------------------------------
class ForwardCounter:
    """Counts the batch rows the UNet sees (a forward hook): forward passes per image, measured."""

    def __init__(self, unet) -> None:
        self.rows = 0
        self.handle = unet.register_forward_pre_hook(self._hook, with_kwargs=True)

    def _hook(self, module, args, kwargs) -> None:
        sample = args[0] if args else kwargs["sample"]
        self.rows += int(sample.shape[0])

    def close(self) -> None:
        self.handle.remove()


@torch.no_grad()
def features(clf, x: torch.Tensor, head: str, labels: torch.Tensor | None) -> dict:
    f = clf.features(x)
    probs = clf.heads[head](f).softmax(-1)
    out = {"features": f, "confidence": probs.max(-1).values, "pixels": x}
    if labels is not None:
        out["correct"] = (probs.argmax(-1) == labels).float()
    return out


def sample(pipe, prompts, seeds, steps, settings, perturbation, sigma, layers) -> tuple[torch.Tensor, float]:
    """All images in one batch (a step's cost here is mostly per call, not per image); returns the
    images in the classifier's input range and the forward passes per image. Without the shared
    prefix (the layers before the first perturbed one run once for both rows, the default
    elsewhere), so every row is one whole UNet pass and NFE is the paper's count; seg-rt's saving
    on top of that is ``bench step``'s to measure."""
    from seg_rt.engines.torch_denoiser import TorchDenoiser
    from seg_rt.pipeline import generate_batch

    engine = TorchDenoiser(
        pipe.unet, sigma=sigma, layers=layers, perturbation=perturbation, shared_prefix=False
    )
    counter = ForwardCounter(pipe.unet)
    try:
        x = generate_batch(
            pipe, prompts, seeds, steps=steps, seg_layers=layers, engine=engine, output_type="pt",
            progress=False, **settings,
        ).cpu().float()  # fmt: skip
    finally:
        counter.close()
        engine.close()
    return to_classifier_input(x), counter.rows / len(prompts)


def _interp(sweep: list[dict], dist: float, key: str) -> tuple[float | None, bool]:
    """``key`` of the CFG sweep (sorted by scale, distances increasing) at distance ``dist``."""
    pts = [(r["dist_to_vanilla"], r[key]) for r in sweep if r.get(key) is not None]
    if not pts:
        return None, False
    pts.sort()
    if dist <= pts[0][0]:
        return pts[0][1], dist < pts[0][0]
    if dist >= pts[-1][0]:
        return pts[-1][1], dist > pts[-1][0]
    for (d0, v0), (d1, v1) in itertools.pairwise(pts):
        if d0 <= dist <= d1:
            w = 0.0 if d1 == d0 else (dist - d0) / (d1 - d0)
            return v0 + w * (v1 - v0), False
    return None, False  # unreachable


RIVAL_KEYS = ("fid", "precision", "recall", "diversity", "accuracy")


class _Case:
    """One (model, case): samples each setting once (cached by name, scale, σ, steps) and scores it
    against the real set, with distances to the vanilla anchor at the bench's step count."""

    def __init__(
        self, pipe, clf, subj: Subject, real: dict, prompts, labels, common: dict, layers, seed_base: int = 0
    ) -> None:
        self.pipe, self.clf, self.subj, self.real = pipe, clf, subj, real
        self.prompts, self.labels, self.common, self.layers = prompts, labels, common, layers
        self.seeds = [seed_base + i for i in range(len(prompts))]
        self.cache: dict[tuple, dict] = {}
        self.anchor: dict | None = None

    def run(
        self, name: str, scale: float, sigma: float, settings: dict, perturbation: str, steps: int
    ) -> dict:
        key = (name, scale, sigma, steps)
        if key not in self.cache:
            t0 = time.perf_counter()
            x, nfe = sample(
                self.pipe, self.prompts, self.seeds, steps, settings, perturbation, sigma, self.layers
            )
            fake = features(self.clf, x, self.subj.label_head, self.labels)
            row = {**self.common, "method": name, "scale": scale, "sigma": sigma_to_json(sigma), "steps": steps,
                   "nfe": round(nfe, 3), "nfe_per_step": round(nfe / steps, 3),
                   **{k: sigma_to_json(v) if k == "seg_sigma" else v for k, v in settings.items()},
                   "seconds": round(time.perf_counter() - t0, 1)}  # fmt: skip
            self.cache[key] = {"fake": fake, "row": row}
        return self.cache[key]

    def scored(self, entry: dict, role: str) -> dict:
        if self.anchor is None:
            self.anchor = entry["fake"]
        return dict(entry["row"], role=role) | score(self.real, entry["fake"], self.anchor)

    def baseline_sweep(self, steps: int, cfg_scales: Sequence[float]) -> list[dict]:
        """Unconditional: vanilla at ``steps``. Prompt cases: the CFG sweep at ``steps``, its
        strength-0 point vanilla at ``2 * steps`` (CFG's forward passes: CFG 1 at ``steps`` would
        be a rival with half the method's NFE)."""
        uncond = self.common["case"] == "unconditional"
        zero = self.run("vanilla", 0.0, math.inf, VANILLA, "blur", steps if uncond else 2 * steps)
        sweep = [self.scored(zero, "rival")]
        if not uncond:
            for s in cfg_scales:
                cfg_row = self.run("cfg", s, math.inf, {"cfg": s, "seg_scale": 0.0}, "blur", steps)
                sweep.append(self.scored(cfg_row, "rival"))
        return sweep


def run_guidance(
    models: Sequence[str] = ("digits", "demo"),
    *,
    cases: Sequence[str] = CASES,
    methods: Sequence[str] = DEFAULT_METHODS,
    samples: int = 64,
    steps: int = 6,
    scales: Sequence[float] = SCALES,
    sigmas: Sequence[float] = SIGMAS,
    case_sigmas: Sequence[float] = CASE_SIGMAS,
    cfg_scales: Sequence[float] = CFG_SCALES,
    modifier_scales: Sequence[float] = MODIFIER_SCALES,
    cfg: float = 3.0,
    layers: Sequence[str] = ("mid",),
    checkpoints: Sequence[str] = CHECKPOINTS,
    seed_base: int = 0,
    device=None,
    emit: Callable[[dict], None] | None = None,
) -> list[dict]:
    """All rows; each is also passed to ``emit`` as soon as it is measured (JSON lines).
    ``seed_base``: image i's seed is ``seed_base + i`` (another base repeats the bench on other seeds
    against the same real set: the seed-to-seed spread of the metrics); recorded when not 0."""
    from seg_rt.pipeline import load_pipeline

    methods = check_methods(methods)
    bad = [c for c in cases if c not in CASES]
    if bad:
        raise ValueError(f"unknown case {bad[0]!r}; known: {', '.join(CASES)}")
    if samples < 8 or steps < 2:
        raise ValueError(f"need samples >= 8 and steps >= 2; got {samples}, {steps}")
    chosen = subjects(models, checkpoints)  # before any model loads: unknown names fail here
    rows: list[dict] = []

    def out(row: dict) -> None:
        rows.append(row)
        if emit is not None:
            emit(row)

    for subj in chosen:
        pipe = load_pipeline(subj.folder, device)
        clf = subj.classifier()
        real_x, labels, captions = subj.real(samples)
        real = features(clf, real_x, subj.label_head, labels)
        size = int(pipe.unet.config.sample_size)
        flow = "FlowMatch" in type(pipe.scheduler).__name__
        for case in cases:
            uncond = case == "unconditional"
            common = {"bench": "guidance", "model": subj.name, "case": case, "samples": samples,
                      "layers": list(layers)} | ({"seed_base": seed_base} if seed_base else {})  # fmt: skip
            c = _Case(pipe, clf, subj, real, [""] * samples if uncond else captions, None if uncond else labels,
                      common, layers, seed_base)  # fmt: skip
            out(
                c.scored(c.run("vanilla", 0.0, math.inf, VANILLA, "blur", steps), "anchor")
                | {"effective_strength": None}
            )
            base_cfg = cfg if case == "conditional" else 1.0
            per_step = 1.0 if uncond else 2.0  # the rival's forward passes per step: vanilla / CFG
            sweeps: dict[int, list[dict]] = {}
            for name in methods:
                g = METHODS[name]
                if (g.needs_cfg or g.modifier) and case != "conditional":
                    continue
                if g.flow_only and not flow:
                    out(common | {"method": name, "role": "skipped", "nfe": None, "effective_strength": None,
                                  "reason": f"defined for flow-matching models; {subj.name} samples with "
                                            f"{type(pipe.scheduler).__name__}"})  # fmt: skip
                    continue
                grid_sigmas = (sigmas if uncond else case_sigmas) if g.uses_sigma else (math.inf,)
                grid_scales = (cfg,) if g.needs_cfg else modifier_scales if g.modifier else scales
                for sigma in grid_sigmas:
                    for s in grid_scales:
                        settings = g.settings(s, sigma, base_cfg, size)
                        row = c.scored(c.run(name, s, sigma, settings, g.perturbation, steps), "method")
                        rival_steps = max(2, round(row["nfe"] / per_step))
                        if rival_steps not in sweeps:
                            sweeps[rival_steps] = c.baseline_sweep(rival_steps, cfg_scales)
                            for r in sweeps[rival_steps]:
                                out(
                                    r
                                    | {
                                        "effective_strength": None if uncond else r["cfg"],
                                        "sweep_steps": rival_steps,
                                    }
                                )
                        out(matched(row, sweeps[rival_steps], uncond) | {"rival_steps": rival_steps})
        del pipe
    return rows


def matched(row: dict, sweep: list[dict], uncond: bool) -> dict:
    """``row`` with its rival at matched NFE (``sweep``: vanilla then the CFG scales, at the
    matching step count): unconditional, vanilla itself; else the CFG sweep read at the
    method's distance to vanilla (``effective_strength``: that CFG scale)."""
    row = dict(row, rival_nfe=sweep[-1]["nfe"])
    if uncond:
        row |= {
            "effective_strength": None,
            "beyond_sweep": False,
            "rival": {k: sweep[0].get(k) for k in RIVAL_KEYS},
        }
    else:
        eff, beyond = _interp(sweep, row["dist_to_vanilla"], "cfg")
        row |= {
            "effective_strength": None if eff is None else round(eff, 3),
            "beyond_sweep": beyond,
            "rival": {k: _round(_interp(sweep, row["dist_to_vanilla"], k)[0]) for k in RIVAL_KEYS},
        }
    return row | {"verdict": verdict(row)}


def _round(v):
    return None if v is None else round(v, 4)


def verdict(row: dict) -> str:
    """Plain words: does the method beat its matched rival on FID and (prompt cases) accuracy?"""
    rival = row["rival"]
    fid_win = row["fid"] < rival["fid"]
    parts = [f"FID {row['fid']:.2f} vs {rival['fid']:.2f} ({'better' if fid_win else 'worse'})"]
    if row.get("accuracy") is not None and rival.get("accuracy") is not None:
        acc_win = row["accuracy"] >= rival["accuracy"]
        parts.append(
            f"accuracy {row['accuracy']:.2f} vs {rival['accuracy']:.2f} ({'better' if acc_win else 'worse'})"
        )
    return "; ".join(parts)


def label(row: dict) -> str:
    m = row["method"]
    if m == "cfg":
        return f"CFG {row['scale']:g}"
    if m == "vanilla":
        return "vanilla"
    if m in METHODS and METHODS[m].modifier:
        return f"{m} cfg {row['scale']:g}"
    sig = f" σ={sigma_label(parse_sigma(row['sigma']))}" if "seg" in m else ""
    return f"{m}{sig} {row['scale']:g}"


def table(rows: list[dict]) -> str:
    """Markdown: one line per method row with its rival at matched NFE and effective strength."""
    lines = [
        "| model | case | method | NFE | eff. CFG | FID | rival FID | acc | rival acc | prec | recall | dist | verdict |",
        "|---" * 13 + "|",
    ]
    for r in rows:
        if r.get("role") != "method":
            continue
        eff = (
            "–"
            if r["effective_strength"] is None
            else f"{r['effective_strength']:g}" + ("*" if r["beyond_sweep"] else "")
        )
        acc = "–" if r.get("accuracy") is None else f"{r['accuracy']:.2f}"
        racc = "–" if r["rival"].get("accuracy") is None else f"{r['rival']['accuracy']:.2f}"
        lines.append(
            f"| {r['model']} | {r['case']} | {label(r)} | {r['nfe']:g} | {eff} | {r['fid']:.1f} | {r['rival']['fid']:.1f} "
            f"| {acc} | {racc} | {r['precision']:.2f} | {r['recall']:.2f} | {r['dist_to_vanilla']:.2f} | {r['verdict']} |"
        )
    return "\n".join(lines)


SEG_FAMILY = ("seg", "seg-uncond", "seg-every2", "seg-window")
# the verdict table's "ties" without a repeat to read them from: FID and accuracy differences below
# these (digits, 500 samples: seed-to-seed p90 0.43 / 0.014)
TIE_FID = 0.4
TIE_ACC = 0.015


def _short(row: dict) -> str:
    """A method row in the verdict table: ``seg σ=2 s=3``, ``tpg s=1``, ``apg cfg 3``."""
    if row["method"] in METHODS and METHODS[row["method"]].modifier:
        return label(row)
    sig = f" σ={sigma_label(parse_sigma(row['sigma']))}" if row["method"] in SEG_FAMILY else ""
    return f"{row['method']}{sig} s={row['scale']:g}"


def _rival_label(row: dict) -> str:
    return (
        f"CFG {row['cfg']:g}, {row['steps']} steps"
        if row["method"] == "cfg"
        else f"vanilla, {row['steps']} steps"
    )


def _acc(row: dict) -> str:
    return "" if row.get("accuracy") is None else f", acc {row['accuracy']:.2f}"


def dominates(a: dict, b: dict, tie: float = TIE_FID, tie_acc: float = TIE_ACC) -> bool:
    """``a`` is no worse than ``b`` on FID and (where both have it) prompt accuracy, and better on
    one of them, each beyond its tie: the FID-accuracy trade-off CFG's scale moves along."""
    acc = a.get("accuracy") is not None and b.get("accuracy") is not None
    no_worse = a["fid"] <= b["fid"] + tie and (not acc or a["accuracy"] >= b["accuracy"] - tie_acc)
    better = a["fid"] < b["fid"] - tie or (acc and a["accuracy"] > b["accuracy"] + tie_acc)
    return no_worse and better


def standing(
    row: dict, rivals: list[dict], tie: float = TIE_FID, tie_acc: float = TIE_ACC
) -> tuple[int, dict]:
    """``row`` against the rivals with its forward passes: 0 when one dominates it (with the
    best-FID such rival), 2 when it dominates every one, else 1 (a tie, or a point on the rivals'
    FID-accuracy frontier); with 1 and 2, the rival at its accuracy: the best FID among the rivals
    at least as accurate (within the tie), else the most accurate one."""
    over = [r for r in rivals if dominates(r, row, tie, tie_acc)]
    if over:
        return 0, min(over, key=lambda r: r["fid"])
    if row.get("accuracy") is None:
        at_acc = min(rivals, key=lambda r: r["fid"])
    else:
        level = [
            r for r in rivals if r.get("accuracy") is not None and r["accuracy"] >= row["accuracy"] - tie_acc
        ]
        at_acc = (
            min(level, key=lambda r: r["fid"]) if level else max(rivals, key=lambda r: r.get("accuracy") or 0)
        )
    return (2 if all(dominates(row, r, tie, tie_acc) for r in rivals) else 1), at_acc


STANDING_WORDS = ("loses to {}", "is on the rivals' frontier (none is better on both FID and accuracy)",
                  "beats every rival")  # fmt: skip


def _standing_words(level: int, rival: dict, uncond: bool) -> str:
    if uncond and level == 1:
        return "ties vanilla"
    return STANDING_WORDS[level].format(_rival_label(rival).split(",")[0])


def _p90(values: list[float]) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(0.9 * len(ordered)))]


MIN_PAIRS = 10  # a spread from fewer repeated rows is not used (its "p90" would be their maximum)


def _finite(r: dict) -> bool:
    return isinstance(r.get("fid"), (int, float)) and math.isfinite(r["fid"])


def seed_spread(rows: list[dict], model: str) -> dict | None:
    """The seed-to-seed spread of ``model``'s rows: the 90th percentile of |FID| and |accuracy|
    differences between each row of seed set 0 and the same row (case, method, scale, σ, steps,
    role, samples) of another seed set; None with fewer than ``MIN_PAIRS`` such pairs."""

    def key(r: dict) -> tuple:
        return (r["case"], r["method"], r.get("scale"), r.get("sigma"), r.get("steps"), r.get("role"),
                r.get("samples"))  # fmt: skip

    mine = [r for r in rows if r.get("model") == model and _finite(r)]
    first = {key(r): r for r in mine if r.get("seed_base", 0) == 0}
    pairs = [(first[key(r)], r) for r in mine if r.get("seed_base", 0) != 0 and key(r) in first]
    if len(pairs) < MIN_PAIRS:
        return None
    accs = [abs(a["accuracy"] - b["accuracy"]) for a, b in pairs
            if a.get("accuracy") is not None and b.get("accuracy") is not None]  # fmt: skip
    return {"fid": round(_p90([abs(a["fid"] - b["fid"]) for a, b in pairs]), 3),
            "accuracy": round(_p90(accs), 3) if accs else None, "pairs": len(pairs)}  # fmt: skip


def _tie(given: float | None, spread: float | None, default: float) -> tuple[float, str]:
    if given is not None:
        return given, "given"
    if spread:  # a spread of 0 (identical repeats) is no tie to read differences against
        return spread, "repeat"
    return default, "default"


def _stand(row: dict, rivals: list[dict], tie: float, tie_acc: float) -> tuple[int, dict] | None:
    """``standing`` against the sweep at the row's rival steps with its forward passes (SLG's window:
    the nearest sweep); None without one. (Older rows lack ``sweep_steps``: there a prompt case's
    vanilla ran at the sweep's steps, half the NFE, and is no rival.)"""
    same = [
        r
        for r in rivals
        if _sweep(r) == row.get("rival_steps") and r["nfe"] == row.get("rival_nfe", r["nfe"])
    ]
    return standing(row, same, tie, tie_acc) if same else None


def case_verdicts(rows: list[dict], tie: float | None = None, tie_acc: float | None = None) -> list[dict]:
    """Per (model, case, seed set): SEG's best row (the one that stands best, then the lowest FID) and where it stands
    against the rivals with the same forward passes per image (``standing``: dominated, on their
    FID-accuracy frontier, or dominating them all) and against its rival at matched NFE and
    effective strength; and the other method that stands best (then: lowest FID). Ties: ``tie`` /
    ``tie_acc`` where given, else the model's ``seed_spread`` where the rows hold a repeat, else
    ``TIE_FID`` / ``TIE_ACC``."""
    out = []
    groups = sorted(
        {(r["model"], r["case"], r.get("seed_base", 0)) for r in rows if r.get("role") == "method"}
    )
    spreads = {m: seed_spread(rows, m) for m in {g[0] for g in groups}}
    for model, case, base in groups:
        spread = spreads[model] or {}
        (t, t_from), (ta, ta_from) = (
            _tie(tie, spread.get("fid"), TIE_FID),
            _tie(tie_acc, spread.get("accuracy"), TIE_ACC),
        )
        sel = [
            r for r in rows
            if (r.get("model"), r.get("case"), r.get("seed_base", 0)) == (model, case, base) and _finite(r)
        ]  # fmt: skip
        rivals = [r for r in sel if r.get("role") == "rival"]
        uncond = case == "unconditional"

        stood = [
            (st, r) for r in sel if r.get("role") == "method" and (st := _stand(r, rivals, t, ta)) is not None
        ]
        seg = [(st, r) for st, r in stood if r["method"] == "seg"]
        if not seg:
            continue
        (level, rival), best = min(seg, key=lambda sr: (-sr[0][0], sr[1]["fid"]))
        others = [(st, r) for st, r in stood if r["method"] not in SEG_FAMILY]
        other = min(others, key=lambda sr: (-sr[0][0], sr[1]["fid"])) if others else None
        eff = best["effective_strength"]
        strength = "–" if eff is None else f"CFG {eff:g}" + ("*" if best.get("beyond_sweep") else "")
        words = [f"SEG {_standing_words(level, rival, uncond)} at matched NFE"]
        if eff is not None:
            matched = best["rival"]
            at = "beats" if dominates(best, matched, t, ta) else "loses to" if dominates(
                matched, best, t, ta) else "ties"  # fmt: skip
            words.append(f"{at} CFG at matched strength")
        out.append({
            "model": model, "case": case, "seed_base": base,
            "seg": f"{_short(best)} ({best['nfe']:g}): {best['fid']:.2f}{_acc(best)}",
            "matched_nfe": f"{_rival_label(rival)} ({rival['nfe']:g}): {rival['fid']:.2f}{_acc(rival)}",
            "matched_strength": f"{strength}: {best['rival']['fid']:.2f}"
            + ("" if best["rival"].get("accuracy") is None else f", acc {best['rival']['accuracy']:.2f}"),
            "verdict": "; ".join(words),
            "seg_standing": level,
            "ties": {"fid": t, "fid_from": t_from, "accuracy": ta, "accuracy_from": ta_from},
            "other": "–" if other is None else
            f"{_short(other[1])} ({other[1]['nfe']:g}): {other[1]['fid']:.2f}{_acc(other[1])}: "
            f"{_standing_words(other[0][0], other[0][1], uncond)} ({_rival_label(other[0][1])}: "
            f"{other[0][1]['fid']:.2f}{_acc(other[0][1])})",
            "other_standing": None if other is None else other[0][0],
        })  # fmt: skip
    return out


def verdict_table(rows: list[dict], tie: float | None = None, tie_acc: float | None = None) -> str:
    """Markdown of ``case_verdicts``: the README's verdict table."""
    lines = [
        "| model | case | seeds (FID / accuracy ties) | best SEG row (NFE): FID | the rival at matched NFE (the one that beats it; else the "
        "best FID at its accuracy): FID | rival at matched NFE and strength: FID | verdict | the other method that stands best "
        "(NFE): FID: where it stands |",
        "|---" * 8 + "|",
    ]
    for v in case_verdicts(rows, tie, tie_acc):
        t = v["ties"]
        ties = (
            f"{v['seed_base']} (ties {t['fid']:g} {t['fid_from']} / {t['accuracy']:g} {t['accuracy_from']})"
        )
        lines.append(f"| {v['model']} | {v['case']} | {ties} | {v['seg']} | {v['matched_nfe']} | "
                     f"{v['matched_strength']} | {v['verdict']} | {v['other']} |")  # fmt: skip
    return "\n".join(lines)


def _sweep(row: dict) -> int:
    """The step count of the rival sweep a row belongs to (its strength-0 point runs at twice it)."""
    return row.get("sweep_steps", row["steps"])


def plot(rows: list[dict], path) -> None:
    """FID against distance to vanilla, one panel per (model, case): the CFG sweep (and vanilla at
    more steps) as the rival curve, each method's scales as points; seed set 0 only."""
    from .figure import figure

    rows = [r for r in rows if not r.get("seed_base")]  # one seed set: a repeat's points would interleave
    panels = sorted({(r["model"], r["case"]) for r in rows})
    if not panels:
        return
    cols = min(3, len(panels))
    nrows = math.ceil(len(panels) / cols)
    with figure(path, "the guidance plot", nrows, cols, figsize=(5 * cols, 4 * nrows), squeeze=False) as (
        _fig,
        axes,
    ):
        for ax, (model, case) in zip(axes.flat, panels, strict=False):
            sel = [r for r in rows if r["model"] == model and r["case"] == case]
            rival = sorted(
                (r for r in sel if r.get("role") in ("rival", "anchor")),
                key=lambda r: (_sweep(r), r["dist_to_vanilla"]),
            )
            for n_steps in sorted({_sweep(r) for r in rival}):
                pts = [r for r in rival if _sweep(r) == n_steps]
                ax.plot([r["dist_to_vanilla"] for r in pts], [r["fid"] for r in pts], "k--o", alpha=0.3 + 0.7 * (n_steps == max(_sweep(r) for r in rival)),
                        markersize=3, label=f"{'CFG sweep' if case != 'unconditional' else 'vanilla'} @ {n_steps} steps")  # fmt: skip
            for key in sorted({(r["method"], r["sigma"]) for r in sel if r.get("role") == "method"}, key=str):
                pts = sorted(
                    (r for r in sel if r.get("role") == "method" and (r["method"], r["sigma"]) == key),
                    key=lambda r: r["scale"],
                )
                ax.plot([r["dist_to_vanilla"] for r in pts], [r["fid"] for r in pts], "-o", markersize=4,
                        label=label(pts[0]).rsplit(" ", 1)[0])  # fmt: skip
            ax.set_title(f"{model}: {case}")
            ax.set_xlabel("distance to vanilla (classifier features)")
            ax.set_ylabel("FID")
            ax.legend(fontsize=6)
        for ax in list(axes.flat)[len(panels) :]:
            ax.axis("off")


REPORT_KEYS = ("model", "case", "method", "role", "steps", "nfe", "fid", "sigma", "scale")


def check_rows(rows: list) -> None:
    """``--report``'s input: bench guidance rows with the keys the verdict and the plot read, and at
    least one SEG row to judge; a ValueError naming the first line that is not."""
    for i, r in enumerate(rows, 1):
        if not isinstance(r, dict) or r.get("bench") != "guidance":
            raise ValueError(f"line {i} is not a bench guidance row")
        if r.get("role") in ("method", "rival", "anchor"):
            missing = [k for k in REPORT_KEYS if k not in r]
            if missing:
                raise ValueError(f"line {i} ({r.get('method')!r} row) lacks {', '.join(missing)}")
    if not any(r.get("role") == "method" and r.get("method") == "seg" for r in rows):
        raise ValueError("no seg method rows to judge")


def read_rows(path: str | Path) -> list[dict]:
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]
