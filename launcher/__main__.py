"""``python -m launcher --config CONFIG [key=value ...]``: same as ``python -m simflow.train`` (see :mod:`launcher.main`)."""

from launcher.main import entry

if __name__ == "__main__":
    entry()
