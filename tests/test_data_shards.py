"""WebDataset shards: exactly-once order over ranks x workers, resume at other world sizes, bad input, S3 (moto on
loopback), pipe:, and the writer's re-run behaviour (issue 3)."""

import json
import os
import shutil
import socket
import threading
import time

import numpy as np
import pytest
import torch
from helpers import register_s3_opener
from PIL import Image

from simflow.data import DataError, Loader, NpzSource
from simflow.data.demo import build_demo, load_npz
from simflow.data.shard_writer import sample_ranges, write_shards
from simflow.data.shards import ShardSource
from simflow.storage import sha256_file

RES = 32
PER_SHARD = 10


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    """60 real photo crops (6 per class) as the demo NPZ, written as 6 local shards."""
    root = tmp_path_factory.mktemp("demo")
    train, _, _ = build_demo(str(root / "npz"), source="photos", limit=60)
    write_shards(train, str(root / "shards"), samples_per_shard=PER_SHARD, progress=False)
    return {"npz": train, "shards": str(root / "shards"), "root": root}


def loader(source, dp_rank=0, dp_size=1, mbs=5, accum=1, consumed=0, workers=0, seed=3):
    return Loader(source, seed=seed, micro_batch_size=mbs, grad_accumulation=accum, dp_rank=dp_rank, dp_size=dp_size,
                  resolution=RES, hflip=True, num_workers=workers, consumed_samples=consumed)


def take(loaders, rounds):
    """Lock-step rounds over a list of rank loaders -> list of per-rank batch lists."""
    iters = [iter(l) for l in loaders]
    return [[next(it) for it in iters] for _ in range(rounds)]


def same_batches(a, b):
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


def test_shards_equal_npz_and_visit_each_sample_once_2ranks_2workers(demo):
    npz = NpzSource(demo["npz"])
    src = ShardSource(demo["shards"])
    assert src.num_samples == 60 and src.num_shards == 6 and src.class_names == npz.class_names
    src.check_parallelism(2, 2)
    # 2 ranks x 2 workers, micro-batch 5, accumulation 2: G = 20, 3 steps per epoch
    shard_loaders = [loader(src, r, 2, mbs=5, accum=2, workers=2) for r in range(2)]
    npz_loaders = [loader(npz, r, 2, mbs=5, accum=2) for r in range(2)]
    got = take(shard_loaders, 6)
    ref = take(npz_loaders, 6)
    ids = []
    for rows_s, rows_n in zip(got, ref):
        for bs, bn in zip(rows_s, rows_n):
            same_batches(bs, bn)  # lossless PNG shards == the NPZ, pixel for pixel, same flips
            ids += bs["sample_id"].tolist()
    assert sorted(ids) == list(range(60))
    assert [l.consumed_samples for l in shard_loaders] == [60, 60]
    assert sum(l.skipped_samples for l in shard_loaders) == 0


@pytest.mark.parametrize("new_dp,new_mbs,new_accum", [(1, 10, 2), (4, 5, 1)])
def test_shard_resume_at_other_world_size(demo, new_dp, new_mbs, new_accum):
    src = ShardSource(demo["shards"])
    full = take([loader(src, r, 2, 5, 2) for r in range(2)], 10)  # G = 20, 5 steps, crosses epochs
    first = [loader(src, r, 2, 5, 2) for r in range(2)]
    take(first, 4)  # 2 steps
    state = first[0].state_dict()
    assert state["consumed_samples"] == 40
    resumed = [loader(src, r, new_dp, new_mbs, new_accum) for r in range(new_dp)]
    for l in resumed:
        l.load_state_dict(state)
    rest = take(resumed, 3 * new_accum)  # steps 2..4
    by_pos_full = {int(p): (int(s), img) for row in full for b in row
                   for p, s, img in zip(b["index"], b["sample_id"], b["image"])}
    n = 0
    for row in rest:
        for b in row:
            for p, s, img in zip(b["index"], b["sample_id"], b["image"]):
                assert by_pos_full[int(p)][0] == int(s) and torch.equal(by_pos_full[int(p)][1], img)
                n += 1
    assert n == 60 and {int(p) for row in rest for b in row for p in b["index"]} == set(range(40, 100))


def _damage(shards_dir):
    """Corrupt JPEG bytes in one sample, truncate one shard, empty another, and rewrite one shard so that one sample
    lacks its class member and one has an empty image member. Returns the damaged sample ids."""
    index = json.load(open(os.path.join(shards_dir, "index.json")))
    sh = index["shards"]
    first = np.concatenate([[0], np.cumsum([s["num_samples"] for s in sh])])  # global id of each shard's sample 0
    bad = set()
    # 1) corrupt JPEG: overwrite the middle of sample 0's image data (tar structure intact)
    name, off, ln = sh[0]["name"], sh[0]["offsets"][3], sh[0]["lengths"][3]
    with open(os.path.join(shards_dir, name), "r+b") as f:
        f.seek(off)
        buf = bytearray(f.read(ln))
        start = buf.find(b"\xff\xda")  # JPEG start-of-scan marker: garble the entropy-coded data after it
        assert start > 0
        buf[start + 20 : start + 400] = os.urandom(380)
        buf[start + 2 : start + 4] = b"\xff\xff"
        f.seek(off)
        f.write(buf)
    bad.add(int(first[0]) + 3)
    # 2) truncated shard: keep the first 4 samples of shard 1
    cut = sh[1]["offsets"][4]
    with open(os.path.join(shards_dir, sh[1]["name"]), "r+b") as f:
        f.truncate(cut + 100)
    bad.update(range(first[1] + 4, first[2]))
    # 3) empty shard
    open(os.path.join(shards_dir, sh[2]["name"]), "wb").close()
    bad.update(range(first[2], first[3]))
    # 4) shard 3 rewritten by a "buggy writer": sample 30 without .cls, sample 31 with an empty image
    import tarfile
    import webdataset as wds

    path = os.path.join(shards_dir, sh[3]["name"])
    members = {}
    with tarfile.open(path) as tf:
        for ti in tf:
            members.setdefault(ti.name.split(".")[0], {})[ti.name.split(".", 1)[1]] = tf.extractfile(ti).read()
    with open(path, "wb") as f, wds.TarWriter(f, mtime=0.0) as tw:
        for k, (key, m) in enumerate(members.items()):
            if k == 0:
                m.pop("cls")
            if k == 1:
                m["jpg"] = b""
            tw.write({"__key__": key, **m})
    keys, offs, lens = sample_ranges(path)
    sh[3].update(offsets=offs, lengths=lens, bytes=os.path.getsize(path), sha256=sha256_file(path))
    bad.update({int(first[3]), int(first[3]) + 1})
    with open(os.path.join(shards_dir, "index.json"), "w") as f:
        json.dump(index, f)
    return bad


@pytest.fixture(scope="module")
def damaged(demo):
    """JPEG shards written from an ImageNet-style folder (one sub-folder per class), then damaged."""
    root = demo["root"] / "folder"
    data = load_npz(demo["npz"])
    for i, (img, lab) in enumerate(zip(data["images"], data["labels"])):
        d = root / f"class_{lab:02d}"
        d.mkdir(parents=True, exist_ok=True)
        Image.fromarray(img).resize((64, 48)).save(d / f"img_{i:03d}.jpg", quality=90)
    (root / "class_00" / "img_broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 not a jpeg")  # corrupt source file
    out = str(demo["root"] / "jpeg_shards")
    doc = write_shards(str(root), out, samples_per_shard=PER_SHARD, resolution=RES, progress=False)
    return out, doc, _damage(out)


def test_make_shards_from_folder_crops_and_skips_corrupt_source(damaged):
    _, doc, _ = damaged
    assert doc["num_samples"] == 60 and len(doc["shards"]) == 7  # 61 source files, one unreadable
    assert [s["origin"] for s in doc["skipped_sources"]] == ["class_00/img_broken.jpg"]
    assert doc["class_names"][0] == "class_00" and doc["class_to_index"]["class_09"] == 9


def test_bad_samples_are_skipped_counted_and_ranks_stay_in_step(damaged, caplog):
    out, _, bad = damaged
    with caplog.at_level("WARNING"):
        src = ShardSource(out, retries=1)
    assert "shard-000001.tar has" in caplog.text  # size mismatch of the truncated shard is reported at start
    loaders = [loader(src, r, 2, mbs=5, accum=2, workers=1 if r else 0) for r in range(2)]
    rows = take(loaders, 6)  # one epoch of 60 positions over both ranks
    ids = [i for row in rows for b in row for i in b["sample_id"].tolist()]
    assert len(ids) == 60 and not set(ids) & bad  # full batches, no damaged sample handed out
    assert all(b["image"].shape == (5, 3, RES, RES) for row in rows for b in row)
    skipped = sum(l.skipped_samples for l in loaders)
    assert skipped >= len(bad)  # every damaged position replaced (stand-ins may themselves be damaged)
    assert loaders[0].state_dict()["skipped_samples"] == loaders[0].skipped_samples
    assert {l.consumed_samples for l in loaders} == {60}
    reasons = set(src.skip_reasons)
    assert {"truncated", "missing class", "empty .jpg member", "cannot decode .jpg"} <= reasons, reasons


def test_missing_shard_and_too_few_shards_fail_at_start(demo, tmp_path):
    copy = tmp_path / "shards"
    shutil.copytree(demo["shards"], copy)
    with pytest.raises(DataError, match="needs at least|shard\\(s\\) for 8 readers"):
        ShardSource(str(copy)).check_parallelism(4, 2)
    os.unlink(copy / "shard-000004.tar")
    with pytest.raises(DataError, match="shard missing: .*shard-000004.tar"):
        ShardSource(str(copy))
    with pytest.raises(DataError, match="index.json"):
        ShardSource(str(tmp_path))


def test_pipe_source_stages_and_matches_local(demo, tmp_path):
    local = ShardSource(demo["shards"])
    piped = ShardSource(f"pipe:cat {demo['shards']}/{{name}}", cache_dir=str(tmp_path / "cache"))
    a, b = loader(local, 1, 2, consumed=20), loader(piped, 1, 2, consumed=20)
    for x, y in zip(take([a], 4), take([b], 4)):
        same_batches(x[0], y[0])
    assert sorted(os.listdir(tmp_path / "cache"))[0].startswith("shard-")


def test_make_shards_rerun_skips_verified_shards(demo, tmp_path):
    out = str(tmp_path / "s")
    write_shards(demo["npz"], out, samples_per_shard=PER_SHARD, progress=False)
    stamp = {f: os.stat(os.path.join(out, f)).st_mtime_ns for f in os.listdir(out) if f.endswith(".tar")}
    digest = sha256_file(os.path.join(out, "shard-000002.tar"))
    with open(os.path.join(out, "shard-000002.tar"), "r+b") as f:
        f.seek(2000)
        f.write(b"garbage")
    time.sleep(0.01)
    write_shards(demo["npz"], out, samples_per_shard=PER_SHARD, progress=False)
    after = {f: os.stat(os.path.join(out, f)).st_mtime_ns for f in stamp}
    assert [f for f in stamp if after[f] != stamp[f]] == ["shard-000002.tar"]
    assert sha256_file(os.path.join(out, "shard-000002.tar")) == digest  # rewritten identically
    assert sha256_file(os.path.join(out, "shard-000001.tar")) == sha256_file(os.path.join(demo["shards"], "shard-000001.tar"))


@pytest.mark.s3
def test_s3_shards_equal_local_and_survive_s3_errors(demo, s3_bucket):
    url = f"s3://{s3_bucket}/demo"
    doc = write_shards(demo["npz"], url, samples_per_shard=PER_SHARD, progress=False)
    assert doc["num_samples"] == 60
    local, remote = ShardSource(demo["shards"]), ShardSource(url, retries=1)
    for x, y in zip(take([loader(local, 0, 2, workers=0)], 6), take([loader(remote, 0, 2, workers=2)], 6)):
        same_batches(x[0], y[0])
    # standard WebDataset pipelines read the same shards from s3:// through the registered opener
    import webdataset as wds

    register_s3_opener()
    keys = [s["__key__"] for s in wds.WebDataset(f"{url}/shard-000001.tar", shardshuffle=False)]
    assert keys == [f"{i:08d}" for i in range(10, 20)]
    # an object disappears mid-run: bounded retries, then skip and count; the run goes on with full batches
    import s3fs

    fs = s3fs.S3FileSystem(skip_instance_cache=True)
    fs.rm(f"{url}/shard-000005.tar")
    # ... and another object is replaced by a truncated copy (a cut-off upload): its last 7 samples are gone
    offsets = json.loads(fs.cat_file(f"{url}/index.json"))["shards"][4]["offsets"]
    fs.pipe_file(f"{url}/shard-000004.tar", fs.cat_file(f"{url}/shard-000004.tar")[: offsets[3] + 700])
    l = loader(remote, 0, 1, mbs=10)
    t0 = time.time()
    ids = [i for (b,) in take([l], 6) for i in b["sample_id"].tolist()]
    assert time.time() - t0 < 30
    assert len(ids) == 60 and not set(ids) & set(range(43, 60))
    assert l.skipped_samples >= 17
    # S3 answers a range past the end of the cut-off object with an error (416), like the missing object (404)
    assert remote.skip_reasons.get("read error", 0) + remote.skip_reasons.get("truncated", 0) >= 17


@pytest.mark.s3
def test_s3_unresponsive_endpoint_times_out(demo):
    """A TCP endpoint that accepts connections but never answers: the loader gives up within its bounds."""
    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen(16)
    conns = []
    stop = threading.Event()

    def accept():
        srv.settimeout(0.2)
        while not stop.is_set():
            try:
                conns.append(srv.accept()[0])
            except OSError:
                pass

    th = threading.Thread(target=accept, daemon=True)
    th.start()
    try:
        t0 = time.time()
        with pytest.raises(DataError, match="index.json"):
            ShardSource("s3://bucket/prefix", endpoint=f"http://127.0.0.1:{srv.getsockname()[1]}", timeout_s=0.5,
                        retries=1)
        assert time.time() - t0 < 10  # (retries + 1) x timeout_s plus back-off, not botocore/s3fs defaults
    finally:
        stop.set()
        th.join()
        for c in conns:
            c.close()
        srv.close()
