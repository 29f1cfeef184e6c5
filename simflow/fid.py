"""``python -m simflow.fid``: FID, sFID, IS, precision and recall of a sample batch (ADM protocol).

Thin entry point; the work is in :mod:`simflow.eval.evaluator` (see its docstring and ``--help``).
"""

from simflow.eval.evaluator import main

if __name__ == "__main__":
    raise SystemExit(main())
