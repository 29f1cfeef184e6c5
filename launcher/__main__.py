"""``python -m launcher --config CONFIG [key=value ...]``: same as ``python -m simflow.train`` (see :mod:`launcher.main`)."""

import sys

from launcher.main import main

if __name__ == "__main__":
    sys.exit(main())
