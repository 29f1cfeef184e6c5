#!/usr/bin/env python
"""Reference statistics (ADM-format .npz) for FID, sFID and precision/recall (issue 7 item 3).

    python tools/fid_ref.py data/demo/demo_test.npz --out data/demo/demo_test_ref.npz \\
        --inception-weights weights/weights-inception-2015-12-05-6726825d.pth
    python tools/fid_ref.py data/demo_shards --out ref.npz --inception-weights W.pth          # shard folder
    python tools/fid_ref.py s3://bucket/imagenet256 --resolution 256 --out ref.npz --inception-weights W.pth

SRC: an image .npz (key 'images' or 'arr_0', uint8 (N, H, W, 3), e.g. tools/make_demo_data.py output) or a shard
set written by tools/make_shards.py (folder, its index.json, s3://bucket/prefix or pipe:...{name}...).
Writes mu/sigma (pool features), mu_s/sigma_s (spatial, sFID), arr_0 (the images, unless --no-images),
pool_features (cached features for precision/recall, unless --no-features) and provenance entries (resolution,
feature extractor and its weights' SHA-256, source and its SHA-256). See simflow/eval/reference.py.
Score samples against it with: python -m simflow.fid SAMPLES.npz --ref OUT --inception-weights W.pth
"""

import argparse
import json
import os
import sys

from simflow.data.loader import DataError
from simflow.eval.features import ImageFormatError, available_feature_extractors, build_feature_extractor
from simflow.eval.npz import NpzError
from simflow.eval.reference import compute_reference, open_image_set, write_reference
from simflow.runtime import resolve_device


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("src", help="image .npz or shard set (folder, index.json, s3://..., pipe:...)")
    p.add_argument("--out", required=True, help="output reference .npz")
    p.add_argument("--inception-weights", default=None, help="local InceptionV3 weights (.pth), never downloaded")
    p.add_argument("--extractor", default="inception", help=f"feature network {list(available_feature_extractors())}")
    p.add_argument("--extractor-weights", default=None, help="weights of a non-Inception --extractor")
    p.add_argument("--key", default=None, help="image array name in an .npz source (default: images, then arr_0)")
    p.add_argument("--resolution", type=int, default=None, help="ADM centre crop to this side (default: keep)")
    p.add_argument("--limit", type=int, default=None, help="use only the first N images")
    p.add_argument("--batch-size", type=int, default=100)
    p.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N")
    p.add_argument("--no-images", action="store_true", help="do not store arr_0 (no precision/recall later)")
    p.add_argument("--no-features", action="store_true", help="do not store the cached pool_features")
    p.add_argument("--no-progress", action="store_true")
    args = p.parse_args(argv)
    weights = args.inception_weights if args.extractor == "inception" else args.extractor_weights
    if not weights:
        flag = "--inception-weights" if args.extractor == "inception" else "--extractor-weights"
        print(f"error: pass {flag} PATH (weights are never downloaded)", file=sys.stderr)
        return 2
    try:
        images = open_image_set(args.src, args.key, args.limit, args.resolution)
        extractor = build_feature_extractor(args.extractor, weights, device=resolve_device(args.device))
        arrays = compute_reference(images, extractor, args.batch_size, keep_images=not args.no_images,
                                   keep_features=not args.no_features, progress=not args.no_progress)
        digest = write_reference(args.out, arrays)
    except (NpzError, ImageFormatError, DataError, FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(json.dumps({
        "out": os.path.abspath(args.out),
        "sha256": digest,
        "source": images.description,
        "num_images": int(arrays["num_images"]),
        "skipped_samples": int(arrays["skipped_samples"]),
        "resolution": [int(v) for v in arrays["resolution"]],
        "keys": sorted(arrays),
        "feature_extractor": extractor.describe(),
    }, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
