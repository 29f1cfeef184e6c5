"""``python -m simflow.train --config configs/tiny.yaml key=value ...`` (alias ``simflow-train``): the same command
as ``python -m simflow.launch`` (:mod:`simflow.launch`: one process, or a rank under ``torchrun``/``srun``)."""

from simflow.launch import entry

if __name__ == "__main__":
    entry()
