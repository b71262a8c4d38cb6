"""seg-rt on a cluster: batch jobs (``seg_rt.cluster.jobs``), the HTTP server (``seg_rt.cluster.serving``),
the ranks of branch-parallel SEG (``branch``), object storage for models and outputs (``storage``) and a
loopback Ray cluster for tests (``localcluster``).

Nothing is imported here, so ``import seg_rt.cluster`` works on a core-only install; Ray, FastAPI and
pydantic (``pip install 'seg-rt[cluster]'``) are imported by the modules that use them.
"""
