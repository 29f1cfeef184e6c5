"""``python -m simflow.train --config configs/tiny.yaml key=value ...`` (alias ``simflow-train``).

Runs in one process, or under ``torchrun``/``srun`` through :mod:`launcher` (which validates the config before any
process group starts and sets up the topology).
"""

from launcher.main import entry, main  # noqa: F401 - main: the simflow-train console script

if __name__ == "__main__":
    entry()
