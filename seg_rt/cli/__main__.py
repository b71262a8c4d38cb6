"""``python -m seg_rt.cli``: the ``seg-rt`` command."""

import sys

from seg_rt.cli import main

sys.exit(main())
