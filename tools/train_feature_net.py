#!/usr/bin/env python
"""Train the demo-FID feature network on the real Fashion-MNIST training split (issue 8 item 1).

    python tools/train_feature_net.py                      # -> weights/demo_fid/fashion_cnn.safetensors (+ .json)
    python tools/train_feature_net.py --epochs 6 --out /tmp/fashion_cnn.safetensors

Data: ``--data DIR`` holding ``demo.npz`` / ``demo_test.npz`` (``tools/make_demo_data.py`` output, Fashion-MNIST
padded to 32x32 RGB); by default ``data/demo`` when it holds Fashion-MNIST, else the images are read straight from
Debian's ``dataset-fashion-mnist`` files under /usr/share/datasets/fashion-mnist (same padding, in memory).
The official 10,000-image test split is never trained on; it scores the network.

Writes the weights (safetensors, with the training record in its metadata), ``<out>.json`` (record + SHA-256) and
``<out>.sha256`` (``sha256sum`` format). Exits with status 1 when the test accuracy is below ``--min-accuracy``
(default 0.90): such a network is not fit to score samples, and nothing is written then.
Score samples with it: ``python -m simflow.fid SAMPLES.npz --ref REF.npz --extractor demo --extractor-weights OUT``;
reference statistics: ``python tools/fid_ref.py data/demo/demo_test.npz --out REF.npz --extractor demo
--extractor-weights OUT``.
"""

import argparse
import json
import os
import subprocess
import sys

import numpy as np

from simflow.eval.demo_features import (
    ACCURACY_THRESHOLD,
    DEFAULT_WEIGHTS,
    save_fashion_cnn,
    train_feature_net,
)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def load_splits(data_dir):
    """(train_images, train_labels, test_images, test_labels, description) from ``data_dir`` or the apt files."""
    from simflow.data.demo import FASHION_MNIST_DIR, fashion_mnist_available, load_fashion_mnist, load_npz

    if data_dir:
        train, test = (os.path.join(data_dir, n) for n in ("demo.npz", "demo_test.npz"))
        with np.load(train) as z:
            source = str(z["source"]) if "source" in z.files else "unknown"
        if source != "fashion_mnist":
            raise ValueError(f"{train}: source={source!r}; the demo feature net is trained on Fashion-MNIST only "
                             f"(rebuild with `python tools/make_demo_data.py {data_dir} --source fashion_mnist`)")
        a, b = load_npz(train), load_npz(test)
        desc = f"{os.path.abspath(train)}, {os.path.abspath(test)}"
    else:
        if not fashion_mnist_available():
            raise FileNotFoundError(f"Fashion-MNIST not found under {FASHION_MNIST_DIR}: "
                                    f"apt-get install dataset-fashion-mnist, or pass --data DIR")
        a, b = load_fashion_mnist("train"), load_fashion_mnist("test")
        desc = f"{FASHION_MNIST_DIR} (padded to 32x32 RGB)"
    return a["images"], a["labels"], b["images"], b["labels"], desc


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default=DEFAULT_WEIGHTS, help="weights file (.safetensors)")
    p.add_argument("--data", default=None, help="folder with demo.npz/demo_test.npz (default: data/demo or apt files)")
    p.add_argument("--epochs", type=float, default=4.0)
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--width", type=int, default=32, help="first-stage channels (features are 4*width-d)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    p.add_argument("--min-accuracy", type=float, default=ACCURACY_THRESHOLD,
                   help="fail (exit 1, write nothing) below this test accuracy")
    p.add_argument("--no-progress", action="store_true")
    args = p.parse_args(argv)
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    data_dir = args.data
    if data_dir is None:
        default = os.path.join(ROOT, "data", "demo")
        if os.path.isfile(os.path.join(default, "demo.npz")):
            with np.load(os.path.join(default, "demo.npz")) as z:
                if "source" in z.files and str(z["source"]) == "fashion_mnist":
                    data_dir = default
    try:
        xtr, ytr, xte, yte, desc = load_splits(data_dir)
    except (FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    model, record = train_feature_net(xtr, ytr, xte, yte, epochs=args.epochs, batch_size=args.batch_size,
                                      lr=args.lr, width=args.width, seed=args.seed, progress=not args.no_progress)
    try:
        commit = subprocess.run(["git", "-C", ROOT, "rev-parse", "HEAD"], capture_output=True, text=True,
                                timeout=5).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        commit = ""
    record.update(data=desc, commit=commit or "unknown",
                  command="python tools/train_feature_net.py " + " ".join(argv if argv is not None else sys.argv[1:]))
    acc = record["test_accuracy"]
    print(json.dumps({k: record[k] for k in ("test_accuracy", "train_accuracy", "steps", "seconds")}), flush=True)
    if acc < args.min_accuracy:
        print(f"error: test accuracy {acc:.4f} < --min-accuracy {args.min_accuracy}; weights not written "
              f"(train longer: --epochs)", file=sys.stderr)
        return 1
    digest = save_fashion_cnn(model, args.out, record)
    record["sha256"] = digest
    record["weights"] = os.path.relpath(os.path.abspath(args.out), ROOT)
    with open(args.out + ".json", "w") as f:
        json.dump(record, f, indent=2, sort_keys=True)
        f.write("\n")
    with open(args.out + ".sha256", "w") as f:
        f.write(f"{digest}  {os.path.basename(args.out)}\n")
    print(json.dumps({"out": os.path.abspath(args.out), "sha256": digest, "test_accuracy": acc}, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
