"""Exactness tests of the transformer flow (method §4): invertibility, log-det, causality, KV cache, init."""

import math

import pytest
import torch

from simflow.config import FlowConfig
from simflow.models.flow import Guidance, TransformerFlow, patchify, unpatchify


def make_flow(seed=0, randomize=True, **kw):
    """A tiny flow; ``randomize`` replaces the zero inits (adaLN-Zero, head) so the map is far from identity."""
    torch.manual_seed(seed)
    args = dict(width=32, num_blocks=3, layers_per_block=[1, 1, 2], head_dim=8, num_classes=5, patch_size=1)
    args.update(kw)
    cfg = FlowConfig(**args)
    flow = TransformerFlow(cfg, in_channels=kw.pop("in_channels", 3), latent_size=4)
    if randomize:
        with torch.no_grad():
            for p in flow.parameters():
                if p.abs().sum() == 0:
                    p.normal_(std=0.1)
    return flow.eval()


CONFIGS = [
    dict(patch_size=1),
    dict(patch_size=2),
    dict(patch_size=2, scale_param="exp", soft_clip=0.0),
    dict(patch_size=1, num_blocks=2, layers_per_block=[2, 3], width=48, head_dim=16),
]


@pytest.mark.parametrize("kw", CONFIGS)
def test_inverse_recovers_input(kw):
    flow = make_flow(**kw)
    x = torch.randn(3, 3, 4, 4)
    y = torch.tensor([0, 4, 5])  # 5 = null class
    z, log_det, _ = flow(x, y)
    assert z.shape == (3, flow.num_tokens, flow.token_dim)
    assert (z - patchify(x, flow.patch_size)).abs().max() > 1e-2, "randomised flow should not be the identity"
    x_rec = flow.inverse(z, y)
    assert (x_rec - x).abs().max().item() < 1e-4


@pytest.mark.parametrize("kw", CONFIGS[:3])
def test_log_det_matches_brute_force_jacobian(kw):
    flow = make_flow(**kw)
    x = torch.randn(1, 3, 4, 4)  # d = 48
    y = torch.tensor([2])
    _, log_det, _ = flow(x, y)

    def fn(v):
        return flow(v.reshape(1, 3, 4, 4), y)[0].reshape(-1)

    jac = torch.autograd.functional.jacobian(fn, x.reshape(-1))
    sign, ref = torch.linalg.slogdet(jac.double())
    assert sign.item() > 0
    assert abs(log_det.item() - ref.item()) / abs(ref.item()) < 1e-4


def test_affine_params_are_causal():
    """Perturbing (permuted) token t never changes the (a, b) of positions <= t within a block."""
    flow = make_flow()
    block = flow.blocks[1]
    c = flow.condition(torch.tensor([1, 2]))
    x = torch.randn(2, flow.num_tokens, flow.token_dim)
    a0, b0 = block.head_output(block.shifted(x), c)[0].chunk(2, dim=-1)
    for t in [0, 5, flow.num_tokens - 1]:
        x2 = x.clone()
        x2[:, t] += 3.0
        a1, b1 = block.head_output(block.shifted(x2), c)[0].chunk(2, dim=-1)
        assert torch.equal(a1[:, : t + 1], a0[:, : t + 1]) and torch.equal(b1[:, : t + 1], b0[:, : t + 1])
        if t < flow.num_tokens - 1:
            assert (a1[:, t + 1 :] - a0[:, t + 1 :]).abs().max() > 1e-4  # later tokens do see it


def test_forward_is_causal_end_to_end_in_raster_order_of_last_block():
    """d z_i / d x_j of one block is triangular: brute-force Jacobian of a single-block flow."""
    flow = make_flow(num_blocks=1, layers_per_block=[2])
    t, c = flow.num_tokens, flow.token_dim
    tokens = torch.randn(1, t, c)
    y = torch.tensor([3])

    def fn(v):
        return flow(unpatchify(v.reshape(1, t, c), 1, 3, 4), y)[0].reshape(-1)

    jac = torch.autograd.functional.jacobian(fn, tokens.reshape(-1))
    jt = jac.reshape(t, c, t, c).abs().sum(dim=(1, 3))  # token-to-token influence
    assert torch.all(jt.triu(diagonal=1) == 0)
    assert torch.all(jt.tril(diagonal=-1).sum(dim=1)[1:] > 0)  # every later token depends on earlier ones


@pytest.mark.parametrize("mode", ["linear", "gaussian", "deep_only"])
@pytest.mark.parametrize("anneal", [False, True])
def test_kv_cached_inverse_equals_naive(mode, anneal):
    flow = make_flow(patch_size=2)
    noise = torch.randn(3, flow.num_tokens, flow.token_dim)
    y = torch.tensor([0, 3, 4])
    g = Guidance(scale=1.5, mode=mode, anneal=anneal)
    fast = flow.inverse(noise, y, g)
    slow = flow.inverse(noise, y, g, use_cache=False)
    assert (fast - slow).abs().max().item() < 1e-5
    unguided = flow.inverse(noise, y)
    assert (fast - unguided).abs().max().item() > 1e-3, "guidance must change the samples"


def test_guidance_scale_zero_is_exact_inverse():
    flow = make_flow()
    x = torch.randn(2, 3, 4, 4)
    y = torch.tensor([1, 2])
    z, _, _ = flow(x, y)
    for mode in ["linear", "gaussian", "deep_only"]:
        assert (flow.inverse(z, y, Guidance(0.0, mode)) - x).abs().max() < 1e-4


def test_gaussian_guidance_matches_product_of_gaussians():
    """STARFlow guidance samples N(mu_eff, sigma_eff^2) proportional to p_c^{1+w} / p_u^w (method §7)."""
    flow = make_flow(scale_param="exp", soft_clip=0.0)
    w = 1.7
    a = torch.tensor([[0.2], [0.5]])  # [cond; uncond] log sigma
    b = torch.tensor([[1.0], [-2.0]])
    log_sigma, mu = flow._guided(a, b, Guidance(w, "gaussian"), w)
    sc, su = math.exp(0.2), math.exp(0.5)
    prec = (1 + w) / sc**2 - w / su**2
    mean = ((1 + w) * 1.0 / sc**2 - w * (-2.0) / su**2) / prec
    assert abs(mu.item() - mean) < 1e-5
    assert abs(log_sigma.item() - 0.5 * math.log(1 / prec)) < 1e-5


def test_identity_at_initialisation():
    """Zero-init heads and adaLN-Zero: z == x, log-det == 0, NLL == 1/2 E|z|^2 + 1/2 log 2 pi (method §5.1)."""
    flow = make_flow(randomize=False)
    x = torch.randn(4, 3, 4, 4)
    y = torch.tensor([0, 1, 2, 5])
    z, log_det, _ = flow(x, y)
    assert torch.allclose(z, patchify(x, 1), atol=1e-6)
    assert log_det.abs().max() < 1e-5
    loss = flow.nll_loss(z, log_det)
    assert torch.allclose(loss, 0.5 * x.pow(2).mean(dim=(1, 2, 3)), atol=1e-6)
    nats = flow.nll_nats_per_dim(loss)
    assert torch.allclose(nats, loss + 0.5 * math.log(2 * math.pi))
    assert torch.allclose(flow.bits_per_dim(loss), nats / math.log(2))


def test_patchify_roundtrip():
    x = torch.randn(2, 5, 8, 8)
    for p in (1, 2, 4):
        t = patchify(x, p)
        assert t.shape == (2, (8 // p) ** 2, 5 * p * p)
        assert torch.equal(unpatchify(t, p, 5, 8), x)


def test_hidden_state_for_repa_is_unpermuted():
    flow = make_flow()
    x = torch.randn(2, 3, 4, 4)
    y = torch.tensor([1, 2])
    _, _, aux = flow(x, y, hidden_layer=2)  # layer 2 = the only layer of block 1 (reversed order)
    block = flow.blocks[1]
    xp = flow._permute(aux["block_outputs"][0], 1)
    c = flow.condition(y)
    h = block.proj_in(block.shifted(xp)) + block.pos_emb
    h = block.layers[0](h, c)
    assert torch.allclose(aux["hidden"], h.flip(1), atol=1e-6)


def test_bad_labels_rejected():
    """Labels are validated at the boundaries (check_labels; the sampling entry point), not inside forward, which
    must not read labels back to the host (no sync in the training step)."""
    flow = make_flow()
    with pytest.raises(ValueError, match="labels must be in"):
        flow.check_labels(torch.tensor([7]))
    with pytest.raises(ValueError, match="labels must be in"):
        flow.inverse(torch.randn(1, flow.num_tokens, flow.token_dim), torch.tensor([-1]))
    flow.check_labels(torch.tensor([0, flow.num_classes]))  # the null class is a valid label
