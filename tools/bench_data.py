#!/usr/bin/env python
"""Data-loading benchmark: decoded img/s per worker at 256x256 (issue 3 "Benchmark"; target >= 300 img/s per core).

    python tools/bench_data.py                      # 512 images, local shards + S3 on loopback + FFCV
    python tools/bench_data.py --images 2048 --workers 1 2 --skip-s3

Builds a 256x256 JPEG (quality 90) data set from random crops of the real photos shipped with scikit-image and
scikit-learn (one class per photo), writes it as WebDataset shards (local folder; the same shards uploaded to a
``moto_server`` started on a free 127.0.0.1 port and stopped by PID afterwards) and as an FFCV file (``jpg`` mode),
then times the SimFlow loader (decode, flip, scale to [-1, 1] float32 (B, 3, 256, 256)) for each. "workers" = DataLoader
processes for shards (0 = in the main process, counted as 1) and FFCV decoding threads. Prints one table.
"""

import argparse
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request

import numpy as np

from PIL import Image

from simflow.data.demo import PHOTO_SOURCES, load_photo
from simflow.data.loader import Loader
from simflow.data.shard_writer import write_shards
from simflow.data.shards import ShardSource

RES = 256


def make_folder(root: str, n: int, seed: int = 0) -> None:
    """n JPEGs of 256x256: random 256-px crops of the shipped photos after a random rescale (short side 256..512)."""
    rng = np.random.default_rng(seed)
    photos = [load_photo(lib, name) for lib, name in PHOTO_SOURCES]
    for i in range(n):
        c = i % len(photos)
        img = Image.fromarray(photos[c])
        s = int(rng.integers(RES, 513)) / min(img.size)
        img = img.resize((max(RES, round(img.size[0] * s)), max(RES, round(img.size[1] * s))), Image.BILINEAR)
        x, y = int(rng.integers(0, img.size[0] - RES + 1)), int(rng.integers(0, img.size[1] - RES + 1))
        d = os.path.join(root, f"{c:02d}_{PHOTO_SOURCES[c][1]}")
        os.makedirs(d, exist_ok=True)
        img.crop((x, y, x + RES, y + RES)).save(os.path.join(d, f"{i:06d}.jpg"), quality=90)


def time_loader(loader, batches: int, warmup: int = 2) -> float:
    """img/s over `batches` micro-batches after `warmup` ones."""
    it = iter(loader)
    for _ in range(warmup):
        next(it)
    t = time.perf_counter()
    n = 0
    for _ in range(batches):
        n += next(it)["image"].shape[0]
    return n / (time.perf_counter() - t)


def start_moto():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    exe = shutil.which("moto_server", path=os.path.dirname(sys.executable) + os.pathsep + os.environ["PATH"])
    if exe is None:
        raise RuntimeError("moto_server not found (pip install 'moto[server]')")
    proc = subprocess.Popen([exe, "-H", "127.0.0.1", "-p", str(port)], stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True)
    endpoint = f"http://127.0.0.1:{port}"
    for _ in range(150):
        try:
            urllib.request.urlopen(endpoint + "/moto-api/", timeout=1)
            break
        except Exception:
            time.sleep(0.2)
    else:
        proc.kill()
        raise RuntimeError("moto_server did not start")
    os.environ.update(AWS_ACCESS_KEY_ID="bench", AWS_SECRET_ACCESS_KEY="bench", AWS_DEFAULT_REGION="us-east-1",
                      AWS_ENDPOINT_URL=endpoint)
    return proc


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--images", type=int, default=512)
    p.add_argument("--batch", type=int, default=32, help="micro-batch size")
    p.add_argument("--batches", type=int, default=12, help="timed micro-batches per measurement")
    p.add_argument("--workers", type=int, nargs="+", default=[0, 2])
    p.add_argument("--skip-s3", action="store_true")
    p.add_argument("--skip-ffcv", action="store_true")
    p.add_argument("--keep", default=None, help="keep the generated data in this folder")
    args = p.parse_args(argv)
    # bad input exits 2 naming the flag, before any work (argparse's error: usage + message on stderr)
    for flag in ("images", "batch", "batches"):
        if getattr(args, flag) < 1:
            p.error(f"--{flag} must be >= 1; got {getattr(args, flag)}")
    if any(w < 0 for w in args.workers):
        p.error(f"--workers must all be >= 0; got {args.workers}")
    work = args.keep or tempfile.mkdtemp(prefix="bench-data-")
    moto = None
    rows = []
    try:
        folder, shards = os.path.join(work, "jpeg"), os.path.join(work, "shards")
        if not os.path.isdir(folder):
            print(f"building {args.images} 256x256 JPEGs in {folder} ...", flush=True)
            make_folder(folder, args.images)
        write_shards(folder, shards, samples_per_shard=max(1, args.images // 8), progress=False)

        # decode-only reference: PIL JPEG decode of one 256x256 image, one core
        files = [os.path.join(r, f) for r, _, fs in os.walk(folder) for f in fs][:200]
        blobs = [open(f, "rb").read() for f in files]
        import io

        t = time.perf_counter()
        for b in blobs:
            Image.open(io.BytesIO(b)).convert("RGB").load()
        rows.append(("PIL decode only (reference)", 1, len(blobs) / (time.perf_counter() - t)))

        def shard_loader(src, w):
            return Loader(src, seed=0, micro_batch_size=args.batch, grad_accumulation=1, dp_rank=0, dp_size=1,
                          resolution=RES, num_workers=w)

        local = ShardSource(shards)
        for w in args.workers:
            rows.append(("WebDataset shards, local", w, time_loader(shard_loader(local, w), args.batches)))
        if not args.skip_s3:
            moto = start_moto()
            import s3fs

            s3fs.S3FileSystem(skip_instance_cache=True).mkdir("bench")
            write_shards(folder, "s3://bench/shards", samples_per_shard=max(1, args.images // 8), progress=False)
            remote = ShardSource("s3://bench/shards")
            for w in args.workers:
                rows.append(("WebDataset shards, S3 (moto, loopback)", w,
                             time_loader(shard_loader(remote, w), args.batches)))
            staged = ShardSource("s3://bench/shards", cache_dir=os.path.join(work, "cache"))
            for w in args.workers:
                rows.append(("  same, staged to data.cache_dir", w, time_loader(shard_loader(staged, w), args.batches)))
        if not args.skip_ffcv:
            try:
                from simflow.data.ffcv_loader import BetonInfo, FfcvLoader, write_beton
            except ImportError as e:
                print(f"FFCV skipped: {e}")
            else:
                beton = os.path.join(work, "bench.beton")
                write_beton(folder, beton, write_mode="jpg", jpeg_quality=90)
                for w in args.workers:
                    fl = FfcvLoader(BetonInfo(beton), seed=0, micro_batch_size=args.batch, grad_accumulation=1,
                                    dp_rank=0, dp_size=1, resolution=RES, num_workers=max(1, w))
                    time_loader(fl, 2)  # numba JIT compile on first use
                    rows.append(("FFCV .beton (jpg), threads", max(1, w), time_loader(fl, args.batches)))
    finally:
        if moto is not None:
            os.kill(moto.pid, 15)
            moto.wait(timeout=10)
        if args.keep is None:
            shutil.rmtree(work, ignore_errors=True)

    print(f"\ndecoded img/s at {RES}x{RES} (micro-batch {args.batch}, {os.cpu_count()} CPU cores on this machine)")
    print(f"{'source':<40} {'workers':>7} {'img/s':>9} {'img/s/worker':>13}")
    for name, w, rate in rows:
        per = rate / max(1, w)
        print(f"{name:<40} {w:>7} {rate:>9.0f} {per:>13.0f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
