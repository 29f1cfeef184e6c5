#!/usr/bin/env python
"""Build the real demo data set offline (issue 2 item 7).

    python tools/make_demo_data.py data/demo                      # Fashion-MNIST from apt, else photo crops
    python tools/make_demo_data.py data/demo --source photos      # crops of the photos shipped with skimage/sklearn
    python tools/make_demo_data.py data/demo --limit 2000         # first 2000 images per split

Writes OUT_DIR/demo.npz (train) and OUT_DIR/demo_test.npz (test): images uint8 (N, 32, 32, 3), labels int64 (N,),
class_names (10,). See simflow/data/demo.py.
"""

import argparse
import sys

from simflow.data.demo import FASHION_MNIST_DIR, SOURCES, DemoDataError, build_demo


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("out_dir", help="destination folder")
    p.add_argument("--source", choices=SOURCES, default=None,
                   help="fashion_mnist (apt dataset-fashion-mnist) or photos; default: fashion_mnist if installed")
    p.add_argument("--limit", type=int, default=None, help="cap on images per split")
    p.add_argument("--root", default=FASHION_MNIST_DIR, help="Fashion-MNIST folder (default %(default)s)")
    args = p.parse_args(argv)
    if args.limit is not None and args.limit < 1:
        p.error(f"--limit={args.limit}: must be >= 1")
    try:
        train, test, used = build_demo(args.out_dir, source=args.source, limit=args.limit, root=args.root)
    except DemoDataError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    import numpy as np

    for path in (train, test):
        with np.load(path) as z:
            print(f"{path}: {z['images'].shape[0]} images {z['images'].shape[1:]} from {used}, "
                  f"{len(z['class_names'])} classes")
    return 0


if __name__ == "__main__":
    sys.exit(main())
