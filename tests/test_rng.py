"""simflow.rng: the one per-sample RNG module (issue 13). The expected numbers were computed from the code before
the merge (simflow/train/noise.py and the hash in simflow/data/order.py at commit fc00900), so these tests pin the
data order, the per-sample noise and the FID sample noise/labels bit for bit across the move."""

import numpy as np
import torch

from simflow.data.order import GlobalOrder
from simflow.rng import (Stream, drop_labels, per_sample_hash, per_sample_normal, per_sample_rand,
                         per_sample_randint, per_sample_uniform, sample_seed)

IDX = torch.tensor([0, 5, 1000001])


def test_stream_ids_are_unique_and_keep_the_noise_ids():
    assert len({int(s) for s in Stream}) == len(Stream)
    assert [int(Stream[n]) for n in ("PERMUTATION", "POSTERIOR", "LABEL_DROP", "SAMPLE_NOISE", "SAMPLE_LABEL",
                                     "LATENT_NOISE")] == [0, 1, 2, 3, 4, 5]


def test_sample_seed_pinned():
    keys = [(0, 0, 1), (7, 123, 2), (2**40 + 3, 999999, 5), (5, 17, 3), (1, 2, 4)]
    assert [sample_seed(*k) for k in keys] == [1700482428262628912, 5274919796228821720, 3741149092381398846,
                                                6745309936734264998, 7028369320671606288]


def test_per_sample_noise_pinned():
    assert per_sample_normal((2,), 7, IDX, Stream.POSTERIOR).tolist() == [
        [1.7168049812316895, -0.9431146383285522], [0.07435035705566406, 0.5394642949104309],
        [1.0482170581817627, -0.7544263601303101]]
    assert per_sample_normal((1,), 3, IDX, Stream.LATENT_NOISE).tolist() == [
        [1.2001901865005493], [1.0213115215301514], [-1.5704294443130493]]
    assert per_sample_normal((2,), 11, IDX, Stream.SAMPLE_NOISE).tolist() == [
        [1.6319892406463623, -0.33309853076934814], [0.15437455475330353, -0.8691779375076294],
        [0.30057036876678467, -0.2284051775932312]]
    assert per_sample_rand(7, IDX, Stream.LABEL_DROP).tolist() == [0.5180188475181906, 0.6155956076954067,
                                                                    0.7596621734726496]
    assert per_sample_randint(1000, 11, IDX, Stream.SAMPLE_LABEL).tolist() == [189, 581, 916]
    assert drop_labels(torch.tensor([3, 4, 5]), 10, 0.7, 7, IDX).tolist() == [10, 10, 5]


def test_data_hash_pinned():
    # raw stream ids 2 and 3 here: the hash itself is unchanged whatever id a caller passes
    h = per_sample_hash(7, 2, np.array([0, 1, 3]), np.array([5, 60000, 200000]))
    assert [int(x) for x in h] == [14387996622730497519, 1226779056690772110, 11752729599871673041]
    assert [int(x) for x in per_sample_hash(2**63 + 5, 3, 2, np.array([0, 9]))] == [146131897495413833,
                                                                                  18051900532098844963]
    assert per_sample_uniform(7, 2, np.array([0, 1]), np.array([5, 60000])).tolist() == [0.7799748598039252,
                                                                                          0.06650382592119264]


def test_exact_epoch_order_pinned():
    g = GlobalOrder(50, seed=7)
    assert g.epoch_order(0)[:8].tolist() == [10, 45, 24, 46, 20, 12, 37, 0]
    assert g.epoch_order(3)[:8].tolist() == [40, 24, 15, 17, 35, 49, 45, 48]


def test_renumbered_data_streams_draw_from_their_new_ids():
    """RESAMPLE, HFLIP, SUBSTITUTE moved from ids 1, 2, 3 (shared with the noise streams) to 6, 7, 8: their draws
    are the same functions of the new ids (the values before the merge were resample [3, 37, 6, 31, 38, 5, 17, 40],
    hflip [1,1,0,1,0,0,1,0,0,0,0,1,0,0,0,0,0,0], substitute [8, 7, 34])."""
    g = GlobalOrder(50, seed=7)
    pos = np.arange(0, 120, 7)
    assert np.array_equal(g.hflip(pos), per_sample_uniform(7, 7, pos // 50, pos) < 0.5)
    rng = np.random.Generator(np.random.PCG64(np.random.SeedSequence([7, 1, 6])))
    assert np.array_equal(GlobalOrder(50, seed=7, resample=True).epoch_order(1),
                          rng.integers(0, 50, size=50, dtype=np.int64))
    k = int(per_sample_hash(7, 8, 1, 77) % np.uint64(50))
    assert g.substitute(77, 1) == int(g.epoch_order(1)[(27 + max(k, 1)) % 50])
