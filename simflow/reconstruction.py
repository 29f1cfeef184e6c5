"""``python -m simflow.reconstruction``: VAE reconstruction metrics (PSNR in dB, rFID) on held-out images.

Thin entry point; the work is in :mod:`simflow.eval.reconstruction` (see its docstring and ``--help``).
"""

from simflow.eval.reconstruction import main

if __name__ == "__main__":
    raise SystemExit(main())
