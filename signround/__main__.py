"""`python -m signround ...` and `torchrun --nproc-per-node N -m signround quantize ...`: the CLI."""

import sys

from .cli import main

sys.exit(main())
