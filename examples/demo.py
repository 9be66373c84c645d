"""The recis demo (``nox -s demo``): reads the seeded click log with recis-io.

See ``examples/read_clicks.py`` for what it does; arguments are the same.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from read_clicks import main

if __name__ == "__main__":
    sys.exit(main())
