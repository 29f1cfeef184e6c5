"""``python -m simflow.self_score --config C --weights W [--out DIR] [key=value ...]``: demo-FID (NOT Inception
FID) and class accuracy of a trained generator on the demo data, as a training run prints at its end.

Thin entry point; the work is in :mod:`simflow.eval.self_score`.
"""

from simflow.eval.self_score import main

if __name__ == "__main__":
    raise SystemExit(main())
