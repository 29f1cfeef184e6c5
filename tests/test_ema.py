"""EMA decay warm-up (simflow.parallel.engine.ema_decay_at, method §8): values, the engines' use of it, resume."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from simflow.parallel.engine import LocalEngine, ema_decay_at


@pytest.mark.parametrize("n, expected", [(0, 1 / 10), (1, 2 / 11), (10, 11 / 20), (1000, 1001 / 1010)])
def test_warmup_values_below_the_cap(n, expected):
    assert ema_decay_at(n, 0.9999) == pytest.approx(expected, abs=1e-15)


def test_warmup_is_capped_by_the_configured_decay():
    assert ema_decay_at(1000, 0.99) == 0.99  # (1 + 1000) / 1010 = 0.99109 > 0.99
    assert ema_decay_at(10**6, 0.9999) == 0.9999
    assert ema_decay_at(0, 0.0) == 0.0
    with pytest.raises(ValueError, match="-1"):
        ema_decay_at(-1, 0.99)


def _engine(decay: float) -> LocalEngine:
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(3, 2))
    return LocalEngine(net, lr=0.1, betas=(0.9, 0.99), weight_decay=0.0, eps=1e-8, grad_accumulation=1,
                       grad_clip=0.0, warmup_steps=0, schedule="constant", total_steps=10, ema_prefixes=["0"],
                       ema_decay=decay)


def _update(eng: LocalEngine, k: int) -> None:
    x = torch.linspace(-1, 1, 12).reshape(4, 3) * (k + 1)
    eng.backward(eng.module(x).pow(2).mean())
    eng.step()
    eng.ema_update()


def test_local_engine_applies_the_warmup_by_step_count():
    eng = _engine(0.9999)
    w0 = eng.module[0].weight.detach().clone()
    _update(eng, 0)
    w1 = eng.module[0].weight.detach().clone()
    assert torch.allclose(eng.ema["0.weight"], 0.1 * w0 + 0.9 * w1, atol=1e-7)  # n = 0: d = 1/10
    _update(eng, 1)
    w2 = eng.module[0].weight.detach().clone()
    expect = (2 / 11) * (0.1 * w0 + 0.9 * w1) + (9 / 11) * w2  # n = 1: d = 2/11
    assert torch.allclose(eng.ema["0.weight"], expect, atol=1e-7)


def test_warmup_is_exact_across_resume():
    full = _engine(0.999)
    for k in range(6):
        _update(full, k)
    first = _engine(0.999)
    for k in range(3):
        _update(first, k)
    state = first.state_dict()
    resumed = _engine(0.999)
    resumed.load_state_dict(state)
    for k in range(3, 6):
        _update(resumed, k)
    for name in full.ema:
        assert torch.equal(full.ema[name], resumed.ema[name]), name
