"""Where the golden outputs of the original implementation live: $OMNIFLOW_GOLDEN, or ../shared/golden
beside the repository (as CI lays it out)."""
import os
from pathlib import Path

GOLDEN = Path(os.environ.get("OMNIFLOW_GOLDEN") or Path(__file__).resolve().parents[2] / "shared" / "golden")
