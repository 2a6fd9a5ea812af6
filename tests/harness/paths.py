"""Where the shared reference data lives: ``../shared`` beside the checkout.

CI puts the project's checkout and ``shared`` side by side in any directory, so
tests find fixtures relative to this file, never at a fixed path.
``PYNYDUS_SHARED`` points elsewhere when the layout differs.
"""

from __future__ import annotations

import os
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
SHARED = Path(os.environ.get("PYNYDUS_SHARED") or REPO.parent / "shared")
FIXTURES = SHARED / "fixtures"
