"""Export tests reuse the inference tests' builder of training output folders."""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent.parent / "infer"))
