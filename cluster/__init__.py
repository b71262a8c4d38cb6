"""Ray: batch jobs over GPU workers (``seg-rt run`` / ``seg-rt submit``) and the HTTP server.

Ray is imported where used; ``pip install 'seg-rt[cluster]'`` provides it.
"""

from .spec import Item, JobSpec, expand_items, item_seed, load_job

__all__ = ["Item", "JobSpec", "expand_items", "item_seed", "load_job"]
