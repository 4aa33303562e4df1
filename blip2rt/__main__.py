"""`python -m blip2rt ...` (what `torchrun -m blip2rt train ...` runs)."""

import sys

from .cli import main

sys.exit(main())
