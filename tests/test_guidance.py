"""Classifier-free guidance of the flow (method §7): every mode on a hand-computed two-token example, the token
ramp of ``anneal``, which label each block sees, and the soft clip on the shift (method §4.3 step 6)."""

from __future__ import annotations

import math

import pytest
import torch

from simflow.config import FlowConfig
from simflow.models.flow import SOFTPLUS_SHIFT, Guidance, TransformerFlow


def _flow(scale_param="softplus", soft_clip=4.0, num_classes=5, layers=(1, 1, 2)):
    torch.manual_seed(0)
    cfg = FlowConfig(width=32, num_blocks=len(layers), layers_per_block=list(layers), head_dim=8,
                     num_classes=num_classes, patch_size=1, scale_param=scale_param, soft_clip=soft_clip)
    return TransformerFlow(cfg, in_channels=2, latent_size=2)


# raw head outputs of one sample, two tokens, one channel: [conditional; unconditional]
A_C, A_U = [0.3, -0.6], [-0.2, 0.5]
B_C, B_U = [1.0, 6.0], [-1.0, 2.0]


def _raw():
    a = torch.tensor([[[A_C[0]], [A_C[1]]], [[A_U[0]], [A_U[1]]]])  # (2B=2, T=2, C=1)
    b = torch.tensor([[[B_C[0]], [B_C[1]]], [[B_U[0]], [B_U[1]]]])
    return a, b


def _clip(x, c=4.0):
    return c * math.tanh(x / c)


def _log_softplus_sigma(a):
    return math.log(math.log1p(math.exp(_clip(a) + SOFTPLUS_SHIFT)))


@pytest.mark.parametrize("mode", ["linear", "deep_only", "deep_only_cond"])
def test_linear_modes_guide_log_sigma_and_mean_after_the_clip(mode):
    flow = _flow()
    a, b = _raw()
    w = 1.5
    ls, mu = flow._guided(a, b, Guidance(w, mode), w)
    for t in range(2):
        lc, lu = _log_softplus_sigma(A_C[t]), _log_softplus_sigma(A_U[t])
        mc, mu_u = _clip(B_C[t]), _clip(B_U[t])
        assert ls[0, t, 0].item() == pytest.approx(lc + w * (lc - lu), abs=1e-6)
        assert mu[0, t, 0].item() == pytest.approx(mc + w * (mc - mu_u), abs=1e-6)


def test_linear_guidance_has_the_same_strength_under_exp_and_softplus():
    """Same w, same conditional/unconditional log-scales -> the same guided log-scale in both parametrisations."""
    w = 2.0
    ls_target_c, ls_target_u = 0.25, -0.1
    exp_flow, sp_flow = _flow("exp", 0.0), _flow("softplus", 0.0)
    inv_sp = lambda ls: math.log(math.expm1(math.exp(ls))) - SOFTPLUS_SHIFT  # raw a with log softplus(a+s) = ls
    a_exp = torch.tensor([[[ls_target_c]], [[ls_target_u]]])
    a_sp = torch.tensor([[[inv_sp(ls_target_c)]], [[inv_sp(ls_target_u)]]])
    b = torch.zeros(2, 1, 1)
    ls_exp, _ = exp_flow._guided(a_exp, b, Guidance(w, "linear"), w)
    ls_sp, _ = sp_flow._guided(a_sp, b, Guidance(w, "linear"), w)
    expected = ls_target_c + w * (ls_target_c - ls_target_u)
    assert ls_exp.item() == pytest.approx(expected, abs=1e-6)
    assert ls_sp.item() == pytest.approx(expected, abs=1e-5)


def test_gaussian_mode_two_tokens():
    flow = _flow()
    a, b = _raw()
    w = 0.8
    ls, mu = flow._guided(a, b, Guidance(w, "gaussian"), w)
    for t in range(2):
        sc, su = math.exp(_log_softplus_sigma(A_C[t])), math.exp(_log_softplus_sigma(A_U[t]))
        mc, mu_u = _clip(B_C[t]), _clip(B_U[t])
        s = min(sc / su, 1.0) ** 2
        denom = 1 + w - w * s
        assert mu[0, t, 0].item() == pytest.approx(((1 + w) * mc - w * s * mu_u) / denom, abs=1e-5)
        assert ls[0, t, 0].item() == pytest.approx(math.log(sc / math.sqrt(denom)), abs=1e-5)


def test_soft_clip_bounds_the_shift_too():
    flow = _flow(soft_clip=4.0)
    ls, b = flow._affine_params(torch.tensor([0.0, 40.0]), torch.tensor([10.0, -100.0]))
    assert b.tolist() == pytest.approx([4 * math.tanh(2.5), -4.0], abs=1e-6)
    assert ls[0].item() == pytest.approx(0.0, abs=1e-6)  # softplus(0 + 0.5413) = 1
    assert _flow(soft_clip=0.0)._affine_params(torch.zeros(1), torch.tensor([10.0]))[1].item() == 10.0


@pytest.mark.parametrize("mode, first, last", [("linear", 0.0, 3.0), ("deep_only", 0.0, 3.0),
                                               ("deep_only_cond", 0.0, 3.0), ("gaussian", 3.0 / 64, 3.0)])
def test_anneal_weights_at_first_and_last_token(mode, first, last):
    g = Guidance(3.0, mode, anneal=True)
    assert g.weight(0, 64) == pytest.approx(first, abs=1e-12)
    assert g.weight(63, 64) == pytest.approx(last, abs=1e-12)
    assert g.weight(1, 64) == pytest.approx(3.0 / 63 if mode != "gaussian" else 6.0 / 64, abs=1e-12)
    assert Guidance(3.0, mode).weight(0, 64) == 3.0  # no anneal: constant
    assert g.weight(0, 1) == pytest.approx(3.0 if mode != "gaussian" else 3.0)


@pytest.mark.parametrize("mode, shallow", [("deep_only", "null"), ("deep_only_cond", "cond"),
                                           ("linear", "both"), ("gaussian", "both")])
def test_labels_seen_by_each_block(mode, shallow, monkeypatch):
    """deep_only (STARFlow cond_top_only): the shallow blocks receive only the null class; the deep block both."""
    flow = _flow()
    seen = {}
    for k, block in enumerate(flow.blocks):
        real = block.head_output

        def spy(inp, c, *args, _k=k, _real=real, **kw):
            seen.setdefault(_k, c.detach().clone())
            return _real(inp, c, *args, **kw)

        monkeypatch.setattr(block, "head_output", spy)
    y = torch.tensor([1, 3])
    noise = torch.randn(2, flow.num_tokens, flow.token_dim)
    flow.inverse(noise, y, Guidance(1.0, mode))
    cond, null = flow.condition(y), flow.condition(torch.full_like(y, flow.num_classes))
    want = {"null": null, "cond": cond, "both": torch.cat([cond, null])}[shallow]
    for k in range(len(flow.blocks) - 1):
        assert torch.equal(seen[k], want), (mode, k)
    assert torch.equal(seen[len(flow.blocks) - 1], torch.cat([cond, null]))

