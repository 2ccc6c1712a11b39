"""`python -m loratune ...`: the `loratune` command, for launchers that start modules (`torchrun -m loratune train
CONFIG`, `accelerate launch -m loratune train CONFIG`: docs/multi-gpu.md)."""

import sys

from loratune.cli import main

sys.exit(main())
