"""seg-rt's benchmarks (``seg-rt bench WHAT``; docs/benchmarks.md says what each measures).

Speed is measured as ratios of alternating pairs in one process (``timing``): shared machines are
noisy, so nothing here is a timed test. One module per concern:

- ``timing``: alternating-pair ratios and percentiles;
- ``reference``: the reference SEG-SDXL blur (k×k depthwise conv2d), the cost baseline here and the
  tests' oracle (``tests/reference_seg.py``); it imports nothing from seg_rt;
- ``figure``: the one place a plot is made and written atomically;
- ``models``: SD1.5- / SDXL-shaped random-weight UNets and their step inputs;
- ``blur``, ``engines``, ``step``, ``gpu``, ``parallel``: the speed benches (``seg-rt bench blur``,
  ``engines``, ``step``, ``gpu``, and the branch-parallel case of ``cluster``);
- ``metrics`` and ``quality``: FID / precision / recall and ``seg-rt bench quality`` on the demo model.

The video benches are ``seg_rt.video.bench``, the Ray job and serving benches ``seg_rt.cluster.bench``.
"""
