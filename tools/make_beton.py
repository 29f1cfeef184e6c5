#!/usr/bin/env python
"""Write an FFCV .beton (+ .beton.json sidecar) from an ImageNet-style folder or the demo NPZ (issue 3 item 3).

    python tools/make_beton.py data/demo/demo.npz data/demo.beton
    python tools/make_beton.py /datasets/imagenet/train /scratch/imagenet256.beton --resolution 256 --mode jpg --workers 32

Needs the ffcv extra: apt-get install libopencv-dev libturbojpeg0-dev && pip install '.[ffcv]'.
DEST may be s3://bucket/key.beton (written locally, then uploaded; the loader stages it back to data.cache_dir).
"""

import argparse
import logging
import sys



def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("src", help="ImageNet-style class folder or demo .npz")
    p.add_argument("dest", help="output .beton (local or s3://)")
    p.add_argument("--resolution", type=int, default=None, help="ADM centre crop to this size (default: keep)")
    p.add_argument("--mode", choices=("raw", "jpg", "smart"), default="raw", help="FFCV image storage")
    p.add_argument("--jpeg-quality", type=int, default=90)
    p.add_argument("--workers", type=int, default=1)
    p.add_argument("--endpoint", default=None, help="S3 endpoint URL (default: AWS_ENDPOINT_URL / AWS default)")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(message)s")
    try:
        from simflow.data.ffcv_loader import write_beton

        doc = write_beton(args.src, args.dest, args.resolution, args.mode, args.jpeg_quality, args.workers,
                          args.endpoint)
    except (ImportError, FileNotFoundError, ValueError, RuntimeError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"{args.dest}: {doc['num_samples']} samples, {len(doc['class_names'])} classes, "
          f"{len(doc['skipped_sources'])} unreadable source images skipped")
    return 0


if __name__ == "__main__":
    sys.exit(main())
