"""`torchrun --nproc_per_node=N -m accelops.train CONFIG` (or `python -m accelops.train CONFIG`)."""

import sys

from .run import main

sys.exit(main())
