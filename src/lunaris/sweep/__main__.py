"""`python -m lunaris.sweep --worker train|calibrate ...`: one run of a sweep, in the fresh process run_sweep starts."""

import sys

from lunaris.sweep.runner import worker_main

if __name__ == "__main__":
    sys.exit(worker_main())
