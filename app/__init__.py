"""selfnorm's command-line application (``python -m app``)."""
import sys
from pathlib import Path

# The project's top-level packages have common names (data, models): a ./data folder in the
# user's working directory (where datasets often live) must not shadow them. Putting the
# project root first lets Python's path finder pick our regular packages over such folders.
_ROOT = str(Path(__file__).resolve().parents[1])
if _ROOT not in sys.path[:1]:
    sys.path.insert(0, _ROOT)
