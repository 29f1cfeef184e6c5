#!/usr/bin/env python
"""Write WebDataset tar shards + index.json from an ImageNet-style folder or the demo NPZ (issue 3 item 1).

    python tools/make_shards.py data/demo/demo.npz data/demo_shards --samples-per-shard 1000
    python tools/make_shards.py /datasets/imagenet/train s3://my-bucket/imagenet256 --resolution 256 --workers 32

SRC: a folder with one sub-folder per class (the ImageNet train layout) or a .npz from tools/make_demo_data.py.
DEST: a local folder or s3://bucket/prefix (endpoint/credentials from the standard AWS environment variables or
--endpoint). Re-running skips shards that already exist and verify (sha256 and planned keys). See
simflow/data/shard_writer.py for the format.
"""

import argparse
import logging
import sys

from simflow.data.shard_writer import write_shards


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("src", help="ImageNet-style class folder or demo .npz")
    p.add_argument("dest", help="local folder or s3://bucket/prefix")
    p.add_argument("--samples-per-shard", type=int, default=1000)
    p.add_argument("--resolution", type=int, default=None, help="ADM centre crop to this size (default: keep)")
    p.add_argument("--format", dest="image_format", choices=("keep", "jpg", "png"), default="keep",
                   help="keep = original bytes where possible (PNG for .npz sources)")
    p.add_argument("--workers", type=int, default=1, help="encoder processes")
    p.add_argument("--endpoint", default=None, help="S3 endpoint URL (default: AWS_ENDPOINT_URL / AWS default)")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(message)s")
    try:
        doc = write_shards(args.src, args.dest, args.samples_per_shard, args.resolution, args.image_format,
                           args.workers, args.endpoint)
    except (FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"{args.dest}: {len(doc['shards'])} shards, {doc['num_samples']} samples, {len(doc['class_names'])} classes, "
          f"{len(doc['skipped_sources'])} unreadable source images skipped")
    return 0


if __name__ == "__main__":
    sys.exit(main())
