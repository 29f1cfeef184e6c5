"""The training step on the DeepSpeed and the FSDP2 engines, 2 CPU processes (gloo): a NaN loss on one rank only is
skipped by every rank, bit for bit; repeated skips stop every rank with status 3; DeepSpeed reduces gradients in
fp32 under bf16 autocast. Multi-process, hence ``slow``."""

from __future__ import annotations

import math
import os

import pytest
import torch

from parallel_workers import bf16_reduce_worker, nonfinite_worker, spawn
from simflow.train.signals import NONFINITE_EXIT_CODE

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def demo_npz(tmp_path_factory):
    from simflow.data.demo import build_demo

    train, _, _ = build_demo(str(tmp_path_factory.mktemp("demo")), limit=256)
    return train


def _equal_bits(a, b) -> bool:
    if torch.is_tensor(a):
        return a.dtype == b.dtype and a.shape == b.shape and torch.equal(a.reshape(-1).view(torch.uint8),
                                                                          b.reshape(-1).view(torch.uint8))
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(_equal_bits(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return len(a) == len(b) and all(_equal_bits(x, y) for x, y in zip(a, b))
    if isinstance(a, float) and isinstance(b, float) and math.isnan(a):
        return math.isnan(b)
    return a == b


@pytest.fixture(scope="module", params=["deepspeed", "fsdp2"])
def nonfinite(demo_npz, tmp_path_factory, request):
    out = str(tmp_path_factory.mktemp(f"nonfinite_{request.param}"))
    ov = ["data.source=npz", f"data.path={demo_npz}", f"train.out_dir={out}/run", "logging.wandb=disabled",
          "train.sample_every=0", "loss.gan.start_step=0", "loss.gan.norm=group", "optim.warmup_steps=10",
          "train.ema_decay=0.5", "model.flow.layers_per_block=[1,1,1,1]", f"parallel.engine={request.param}",
          "train.micro_batch_size=4", "train.steps=20", "train.log_every=1", "train.max_skipped_steps=3",
          "checkpoint.every_steps=0", "checkpoint.resume=false"]
    # 0-based step 3 on rank 1 only; then steps 6, 7, 8 (1-based 7-9) on rank 0 only, which end the run in fit()
    spawn(nonfinite_worker, 2, (out, ov, "3@1,6@0,7@0,8@0"), errdir=out, timeout=900)
    return [torch.load(os.path.join(out, f"nonfinite_rank{r}.pt"), weights_only=False) for r in range(2)]


def test_nan_on_one_rank_is_skipped_on_every_rank_bit_for_bit(nonfinite):
    for rank, res in enumerate(nonfinite):
        b, a = res["before_local"], res["after_local"]
        for key in ("gen.master", "gen.adam", "gen.ema", "disc.master", "disc.adam", "disc.ema"):
            assert _equal_bits(b[key], a[key]), f"rank {rank}: {key} changed in the skipped step"
        assert len(b["gen.ema"]) > 0 and all("exp_avg" in s for s in b["gen.adam"])
        assert all(float(s["step"]) == 3.0 for s in a["gen.adam"])  # AdamW's own step count did not advance
        assert _equal_bits(res["before_full"]["module"], res["after_full"]["module"])
        assert _equal_bits(res["before_full"]["ema"], res["after_full"]["ema"])
        assert _equal_bits(res["before_full"]["optimizer"]["state"], res["after_full"]["optimizer"]["state"])
        assert res["steps_after"] == (4, 4, 4)  # trainer, engine and DeepSpeed count attempted steps alike
        assert res["lr_after"] > res["lr_before"]  # the LR schedule follows attempted steps (warm-up goes on)
        assert not _equal_bits(a["gen.master"], res["moved_local"]["gen.master"])  # training continues
        assert res["skipped_steps"] == 1


def test_all_ranks_report_the_same_skip_and_finite_losses_after(nonfinite):
    rows0, rows1 = nonfinite[0]["rows"], nonfinite[1]["rows"]
    assert [r["step"] for r in rows0] == [1, 2, 3, 4, 5, 6]
    assert math.isnan(rows0[3]["loss"]) and not math.isfinite(rows0[3]["grad_norm"])  # rank 1 NaN; DeepSpeed: inf
    for r in rows0[:3] + rows0[4:]:
        assert math.isfinite(r["loss"]) and math.isfinite(r["grad_norm"]) and math.isfinite(r["d_loss"])
    for r0, r1 in zip(rows0, rows1):
        assert _equal_bits({k: v for k, v in r0.items() if k != "img_per_s"},
                           {k: v for k, v in r1.items() if k != "img_per_s"})


def test_repeated_nonfinite_steps_stop_every_rank_with_status_3(nonfinite):
    for res in nonfinite:
        code, message, step = res["exit"]
        assert code == NONFINITE_EXIT_CODE == 3
        assert step == 9 and "3 consecutive non-finite steps up to step 9" in message
        assert "4 in total" in message


@pytest.mark.parametrize("nonfinite", ["deepspeed"], indirect=True)  # FSDP2's local shards have no padding tail
def test_garbage_in_zero3_padding_never_refuses_a_checkpoint(nonfinite):
    """DeepSpeed pads each ZeRO-3 partition to ceil(numel / DP) with uninitialised memory; NaN there (this rank's
    fp32 weights, AdamW moments and EMA tails) is not state: the save commits, and the full state stays finite."""
    assert sum(res["padding_save"]["poisoned"] for res in nonfinite) > 0  # the tiny model has odd-sized tensors
    for rank, res in enumerate(nonfinite):
        assert res["padding_save"]["committed"], f"rank {rank}: {res['padding_save']['dir']} was not committed"
        assert res["padding_save"]["full_finite"]


@pytest.fixture(scope="module")
def bf16_runs(tmp_path_factory):
    """Both DeepSpeed configs, one engine each, in one 2-process launch (one start-up instead of two)."""
    variants = (("fp32_reduce", None), ("bf16_reduce", ["torch.nn.Linear"]))
    out = str(tmp_path_factory.mktemp("bf16_reduce"))
    spawn(bf16_reduce_worker, 2, (out, variants), errdir=out, timeout=600)
    return {name: [torch.load(os.path.join(out, f"{name}_rank{r}.pt"), weights_only=False) for r in range(2)]
            for name, _ in variants}


def test_gradients_are_reduced_in_fp32_under_bf16_autocast(bf16_runs):
    """With the engine's DeepSpeed config the reduced gradient equals the fp32 average (1 + 2^-9) / 2 to 1e-7;
    the same run with DeepSpeed's bf16 comm-dtype tags (the previous config) loses the 2^-9 (the test can fail)."""
    exact = (1.0 + 2.0 ** -9) / 2
    for res in bf16_runs["fp32_reduce"]:
        assert res["autocast"] and res["loss_dtype"] == "torch.bfloat16"
        assert res["comm_dtypes"] == ["torch.float32"]
        assert torch.allclose(res["grad"], torch.full((4, 4), exact), rtol=1e-7, atol=0)
    for res in bf16_runs["bf16_reduce"]:
        assert res["comm_dtypes"] == ["torch.bfloat16"]
        assert torch.equal(res["grad"], torch.full((4, 4), 0.5))
