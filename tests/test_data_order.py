"""Global sample order and the NPZ loader: exactly-once epochs, world-size-independent resume, flips (issue 3)."""

import numpy as np
import pytest
import torch

from simflow.config import load_config
from simflow.data import Loader, NpzSource, build_loader
from simflow.data.order import GlobalOrder, step_positions
from simflow.rng import per_sample_uniform

N = 48
RES = 8


@pytest.fixture(scope="module")
def npz_path(tmp_path_factory):
    """N images whose pixels encode their sample id (red = id, green = column index, so flips are visible)."""
    images = np.zeros((N, RES, RES, 3), np.uint8)
    images[..., 0] = np.arange(N, dtype=np.uint8)[:, None, None]
    images[..., 1] = (np.arange(RES, dtype=np.uint8) * 30)[None, None, :]
    labels = np.arange(N, dtype=np.int64) % 5
    path = tmp_path_factory.mktemp("npz") / "tiny.npz"
    np.savez(path, images=images, labels=labels, class_names=np.array([f"c{i}" for i in range(5)]))
    return str(path)


def make(npz_path, dp_rank, dp_size, mbs, accum, consumed=0, workers=0, seed=7, hflip=True, resample=False):
    return Loader(NpzSource(npz_path), seed=seed, micro_batch_size=mbs, grad_accumulation=accum, dp_rank=dp_rank,
                  dp_size=dp_size, resolution=RES, hflip=hflip, resample=resample, num_workers=workers,
                  consumed_samples=consumed)


def run_steps(npz_path, dp_size, mbs, accum, steps, consumed=0, workers=0, **kw):
    """Consume `steps` optimizer steps on every rank in lock step. Returns per step a dict position -> batch row,
    and the loaders."""
    loaders = [make(npz_path, r, dp_size, mbs, accum, consumed, workers if r == dp_size - 1 else 0, **kw)
               for r in range(dp_size)]
    iters = [iter(l) for l in loaders]
    out = []
    for _ in range(steps):
        rows = {}
        for _m in range(accum):
            for it in iters:
                b = next(it)
                for i in range(len(b["index"])):
                    rows[int(b["index"][i])] = (int(b["sample_id"][i]), int(b["label"][i]), int(b["epoch"][i]),
                                                b["image"][i].clone())
        out.append(rows)
    return out, loaders


def test_epoch_visits_every_sample_once_dp2_accum2(npz_path):
    steps, loaders = run_steps(npz_path, dp_size=2, mbs=3, accum=2, steps=8, workers=2)  # G = 12, 4 steps/epoch
    for epoch in (0, 1):
        ids = [row[0] for s in steps[4 * epoch : 4 * epoch + 4] for row in s.values()]
        assert sorted(ids) == list(range(N))
        assert {row[2] for s in steps[4 * epoch : 4 * epoch + 4] for row in s.values()} == {epoch}
    order0 = [steps[0][p][0] for p in range(12)]
    order1 = [steps[4][p][0] for p in range(48, 60)]
    assert order0 != order1  # a fresh permutation each epoch
    assert order0 != list(range(12))  # actually shuffled
    # positions of each step are exactly [s*G, (s+1)*G)
    for s, rows in enumerate(steps):
        assert sorted(rows) == list(range(12 * s, 12 * (s + 1)))
    # consumed samples after step s on every rank = (s+1)*G
    assert [l.consumed_samples for l in loaders] == [8 * 12, 8 * 12]
    # the image is the sample's own image and the label its own label
    for rows in steps:
        for sid, label, _, img in rows.values():
            red = ((img[0] + 1) * 127.5).round()
            assert torch.all(red == sid) and label == sid % 5


def test_workers_do_not_change_order(npz_path):
    a, _ = run_steps(npz_path, dp_size=2, mbs=3, accum=2, steps=3, workers=0)
    b, _ = run_steps(npz_path, dp_size=2, mbs=3, accum=2, steps=3, workers=2)
    for ra, rb in zip(a, b):
        assert ra.keys() == rb.keys()
        for p in ra:
            assert ra[p][0] == rb[p][0] and torch.equal(ra[p][3], rb[p][3])


def test_micro_batch_j_is_m_times_dp_plus_rank():
    # global batch of step 2 with B=3, A=2, dp=2 covers [24, 36); micro-batch j = m*dp + rank starts at 24 + 3j
    assert step_positions(2, 1, 0, 2, 3, 2).tolist() == [30, 31, 32]
    assert step_positions(2, 0, 1, 2, 3, 2).tolist() == [27, 28, 29]
    assert step_positions(2, 1, 1, 2, 3, 2).tolist() == [33, 34, 35]


@pytest.mark.parametrize("new_dp,new_mbs,new_accum", [(1, 6, 2), (4, 3, 1)])
def test_resume_at_other_world_size_equals_uninterrupted(npz_path, new_dp, new_mbs, new_accum):
    full, _ = run_steps(npz_path, dp_size=2, mbs=3, accum=2, steps=7)  # G = 12, crosses an epoch boundary
    first, loaders = run_steps(npz_path, dp_size=2, mbs=3, accum=2, steps=3)
    state = loaders[0].state_dict()
    assert state["consumed_samples"] == 36 and loaders[1].state_dict() == state
    resumed = [make(npz_path, r, new_dp, new_mbs, new_accum) for r in range(new_dp)]
    for l in resumed:
        l.load_state_dict(state)
    iters = [iter(l) for l in resumed]
    for s in range(3, 7):
        rows = {}
        for _m in range(new_accum):
            for it in iters:
                b = next(it)
                for i in range(len(b["index"])):
                    rows[int(b["index"][i])] = (int(b["sample_id"][i]), b["image"][i])
        assert rows.keys() == full[s].keys()
        for p in rows:
            assert rows[p][0] == full[s][p][0]
            assert torch.equal(rows[p][1], full[s][p][3])  # same pixels, same flip
    assert [l.consumed_samples for l in resumed] == [7 * 12] * new_dp


def test_flip_depends_on_position_only(npz_path):
    order = GlobalOrder(N, seed=7)
    pos = np.arange(0, 4000)
    flips = order.hflip(pos)
    assert 0.45 < flips.mean() < 0.55
    assert np.array_equal(flips, GlobalOrder(N, seed=7).hflip(pos))
    assert not np.array_equal(flips, GlobalOrder(N, seed=8).hflip(pos))
    # the same position gives the same flip on any rank / micro-batch layout
    a, _ = run_steps(npz_path, dp_size=1, mbs=12, accum=1, steps=2)
    b, _ = run_steps(npz_path, dp_size=4, mbs=3, accum=1, steps=2)
    for ra, rb in zip(a, b):
        for p, row in ra.items():
            img = row[3]
            green = ((img[1, 0] + 1) * 127.5).round()  # first row's green channel: column index * 30
            expect = (torch.arange(RES) * 30).flip(0) if flips[p] else torch.arange(RES) * 30
            assert torch.equal(green, expect.float())
            assert torch.equal(img, rb[p][3])
    # flips off: never mirrored
    c, _ = run_steps(npz_path, dp_size=1, mbs=12, accum=1, steps=1, hflip=False)
    for row in c[0].values():
        assert torch.equal(((row[3][1, 0] + 1) * 127.5).round(), (torch.arange(RES) * 30).float())


def test_per_sample_uniform_is_uniform_and_keyed():
    u = per_sample_uniform(3, 5, 0, np.arange(20000))
    assert u.min() >= 0 and u.max() < 1
    assert abs(u.mean() - 0.5) < 0.01 and abs(u.var() - 1 / 12) < 0.005
    assert not np.array_equal(u, per_sample_uniform(3, 6, 0, np.arange(20000)))
    assert not np.array_equal(u, per_sample_uniform(3, 5, 1, np.arange(20000)))


def test_resample_mode_draws_with_replacement(npz_path):
    steps, _ = run_steps(npz_path, dp_size=2, mbs=3, accum=2, steps=4, resample=True)
    ids = [row[0] for s in steps for row in s.values()]
    assert len(ids) == N and len(set(ids)) < N  # duplicates within one "epoch" of N positions
    again, _ = run_steps(npz_path, dp_size=1, mbs=6, accum=2, steps=4, resample=True)
    assert ids == [row[0] for s in again for row in s.values()]


def test_bad_state_is_rejected(npz_path):
    loader = make(npz_path, 0, 2, 3, 2)
    with pytest.raises(ValueError, match="seed"):
        loader.load_state_dict({"consumed_samples": 12, "seed": 8})
    with pytest.raises(ValueError, match="num_samples"):
        loader.load_state_dict({"consumed_samples": 12, "seed": 7, "num_samples": N + 1})
    with pytest.raises(ValueError, match="consumed_samples=-1"):
        loader.load_state_dict({"consumed_samples": -1, "seed": 7})
    with pytest.raises(ValueError, match="missing key 'consumed_samples'"):
        loader.load_state_dict({"seed": 7})
    with pytest.raises(ValueError, match="dp_rank=2"):
        make(npz_path, 2, 2, 3, 2)


def test_build_loader_from_config_resizes(npz_path):
    cfg = load_config(None, [f"data.path={npz_path}", "model.resolution=16", "train.micro_batch_size=4",
                             "train.grad_accumulation=1", "train.seed=1"])
    loader = build_loader(cfg, dp_rank=1, dp_size=2, consumed_samples=8)
    b = next(iter(loader))
    assert b["image"].shape == (4, 3, 16, 16) and b["image"].dtype == torch.float32
    assert b["index"].tolist() == [12, 13, 14, 15]
    assert loader.consumed_samples == 16
    with pytest.raises(FileNotFoundError, match="missing.npz"):
        build_loader(load_config(None, ["data.path=/nonexistent/missing.npz"]), 0, 1)


@pytest.mark.parametrize("workers", [0, 2])
def test_resume_from_a_partial_global_batch_loses_and_repeats_nothing(npz_path, workers):
    """Elastic resume without train.global_batch_size: 5 steps at DP=1 (global batch 4x1x1 = 4 -> consumed 20), then
    DP=2 with accumulation 2 (global batch 12; 20 is no multiple of 12 or of the round size 6), then DP=3 (global
    batch 3x1x3 = 9) from 44. The positions dealt are exactly 0, 1, 2, ... in order, each once, with the same sample
    ids and flips an uninterrupted DP=1 run has at those positions; consumed_samples = sum of the global batches."""
    a, la = run_steps(npz_path, dp_size=1, mbs=4, accum=1, steps=5)
    assert la[0].consumed_samples == 20
    b, lb = run_steps(npz_path, dp_size=2, mbs=3, accum=2, steps=2, consumed=la[0].state_dict()["consumed_samples"],
                      workers=workers)
    assert [l.consumed_samples for l in lb] == [44, 44]
    lc = [make(npz_path, r, 3, 3, 1) for r in range(3)]
    for l in lc:
        l.load_state_dict(lb[0].state_dict())
    c, _ = [], None
    iters = [iter(l) for l in lc]
    for _ in range(3):
        rows = {}
        for it in iters:
            batch = next(it)
            rows.update({int(p): (int(s), batch["image"][i].clone()) for i, (p, s) in
                         enumerate(zip(batch["index"], batch["sample_id"]))})
        c.append(rows)
    assert [l.consumed_samples for l in lc] == [44 + 27] * 3
    assert [sorted(s) for s in b] == [list(range(20, 32)), list(range(32, 44))]
    assert [sorted(s) for s in c] == [list(range(44, 53)), list(range(53, 62)), list(range(62, 71))]
    seen = [p for s in a + b for p in sorted(s)] + [p for s in c for p in sorted(s)]
    assert seen == list(range(71))
    ref, _ = run_steps(npz_path, dp_size=1, mbs=71, accum=1, steps=1)
    for s in a + b:
        for p, row in s.items():
            assert row[0] == ref[0][p][0] and torch.equal(row[3], ref[0][p][3])
    for s in c:
        for p, (sid, img) in s.items():
            assert sid == ref[0][p][0] and torch.equal(img, ref[0][p][3])
    assert len({ref[0][p][0] for p in range(48)}) == N  # the positions still form exact epochs
