"""`python -m emcaps ...` runs the CLI (torchrun needs a module: torchrun -m emcaps train ...)."""

import sys

from emcaps.cli import main

sys.exit(main())
