"""Where the golden outputs of the original implementation live: tests/data/golden in the repository
(see its README.md for what each file is), or $OMNIFLOW_GOLDEN to check another directory in that format."""
import os
from pathlib import Path

GOLDEN = Path(os.environ.get("OMNIFLOW_GOLDEN") or Path(__file__).resolve().parent / "data" / "golden")
