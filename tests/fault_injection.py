"""Test-only fault injection for the job worker (production code has no crash hook).

``CrashOnceWorker`` is the real ``SEGWorker`` that kills its own process (``os._exit``) at its Nth
``run`` call, unless the marker file exists; it creates the marker first, so the replacement the
driver starts does not crash again. Marker and N come from the actor's environment (Ray
``runtime_env``), so the test decides them per run.
"""

import os

from seg_rt.cluster.jobs.worker import SEGWorker

FAULT_FILE_ENV = "SEG_RT_TEST_FAULT_FILE"
FAULT_AFTER_ENV = "SEG_RT_TEST_FAULT_AFTER"


class CrashOnceWorker(SEGWorker):
    def run(self, items):
        marker, after = os.environ.get(FAULT_FILE_ENV), os.environ.get(FAULT_AFTER_ENV)
        if marker and after and self.batches + 1 == int(after) and not os.path.exists(marker):
            open(marker, "w").close()
            os._exit(1)
        return super().run(items)
