"""VAE (method §3): shapes, parameter counts, posterior modes, reparameterisation, KL, building blocks."""

import math

import pytest
import torch
import torch.nn.functional as F
from torch.distributions import Normal, kl_divergence

from simflow.config import VAEConfig
from simflow.models.vae import VAE, AttnBlock, Downsample, ResnetBlock, Upsample


def tiny_cfg(**kw) -> VAEConfig:
    base = dict(base_channels=32, ch_mult=[1, 2, 2], num_res_blocks=1, attn_resolutions=[8], latent_channels=8,
                norm_groups=8)
    base.update(kw)
    return VAEConfig(**base)


def n_params(m: torch.nn.Module) -> int:
    return sum(p.numel() for p in m.parameters())


def n_attn(m: torch.nn.Module) -> int:
    return sum(isinstance(x, AttnBlock) for x in m.modules())


@pytest.mark.parametrize("posterior", ["fixed", "learned"])
def test_tiny_shapes_forward(posterior):
    torch.manual_seed(0)
    vae = VAE(tiny_cfg(posterior=posterior), resolution=32)
    assert vae.downsample_factor == 4
    assert vae.latent_shape() == (8, 8, 8)
    assert vae.latent_shape(64) == (8, 16, 16)
    x = torch.rand(2, 3, 32, 32) * 2 - 1
    mu, logvar = vae.encode(x)
    assert mu.shape == (2, 8, 8, 8) and mu.dtype == torch.float32
    if posterior == "fixed":
        assert logvar is None
    else:
        assert logvar.shape == mu.shape
    z = vae.reparameterize(mu, logvar, torch.randn_like(mu))
    x_hat = vae.decode(z)
    assert x_hat.shape == (2, 3, 32, 32)
    assert torch.isfinite(x_hat).all()
    # non-square / other sizes work (fully convolutional)
    assert vae.decode(vae.encode(torch.zeros(1, 3, 16, 24))[0]).shape == (1, 3, 16, 24)


def test_xl_config_params_and_layout():
    cfg = VAEConfig()  # schema defaults = SimFlow-XL f16d64
    vae = VAE(cfg, resolution=256)
    assert vae.downsample_factor == 16
    assert vae.latent_shape() == (64, 16, 16)
    total = n_params(vae)
    assert 69e6 < total < 85e6, total  # method §3.1: about 70-85M
    # attention only at the 16x16 level: encoder 2 (per res block) + mid 1; decoder 3 + mid 1
    assert n_attn(vae.encoder) == 3 and n_attn(vae.decoder) == 4
    # LDM layout: num_res_blocks per encoder level, num_res_blocks + 1 per decoder level
    assert [len(level.blocks) for level in vae.encoder.down] == [2] * 5
    assert [len(level.blocks) for level in vae.decoder.up] == [3] * 5
    assert vae.encoder.conv_out.out_channels == 64  # mean only
    assert vae.decoder.conv_out.weight.shape == (3, 128, 3, 3)


@pytest.mark.parametrize("ch_mult,res,f", [([1], 16, 1), ([1, 2], 16, 2), ([1, 1, 2, 2], 32, 8)])
def test_any_ch_mult_length(ch_mult, res, f):
    vae = VAE(tiny_cfg(ch_mult=ch_mult, attn_resolutions=[res // f]), resolution=res)
    assert vae.downsample_factor == f
    mu, _ = vae.encode(torch.zeros(1, 3, res, res))
    assert mu.shape == (1, 8, res // f, res // f)
    assert vae.decode(mu).shape == (1, 3, res, res)
    # attention at the coarsest level: one per encoder block + mid, (num_res_blocks + 1) per decoder level + mid
    assert n_attn(vae.encoder) == 1 + 1 and n_attn(vae.decoder) == 2 + 1


def test_fixed_mode_has_no_logvar_head():
    torch.manual_seed(0)
    fixed = VAE(tiny_cfg(posterior="fixed"), 32)
    learned = VAE(tiny_cfg(posterior="learned"), 32)
    L, c_last = 8, 32 * 2
    # encoder conv_out 3x3 gets L extra output channels; quant_conv goes from L x L to 2L x 2L (1x1, with bias)
    extra = L * (c_last * 9 + 1) + ((2 * L) ** 2 + 2 * L) - (L * L + L)
    assert n_params(learned) - n_params(fixed) == extra
    assert fixed.encoder.conv_out.out_channels == L and learned.encoder.conv_out.out_channels == 2 * L


def test_reparameterize_fixed_std_is_half():
    vae = VAE(tiny_cfg(posterior_std=0.5), 32)
    g = torch.Generator().manual_seed(1)
    mu = torch.randn(1, 8, 8, 8, generator=g)
    eps = torch.randn(4000, 8, 8, 8, generator=g)
    z = vae.reparameterize(mu.expand_as(eps), None, eps)
    assert torch.allclose(z - mu, 0.5 * eps, atol=1e-6)
    emp = (z - mu).std().item()
    assert abs(emp - 0.5) < 0.005, emp
    assert vae.posterior_std(None) == 0.5
    with pytest.raises(ValueError, match="eps shape"):
        vae.reparameterize(mu, None, torch.randn(1, 8, 8, 7))


def test_reparameterize_learned_and_gradients():
    vae = VAE(tiny_cfg(posterior="learned"), 32)
    mu = torch.zeros(2, 8, 4, 4, requires_grad=True)
    logvar = torch.full((2, 8, 4, 4), math.log(0.09), requires_grad=True)  # std 0.3
    eps = torch.randn(2, 8, 4, 4)
    z = vae.reparameterize(mu, logvar, eps)
    assert torch.allclose(z, 0.3 * eps, atol=1e-6)
    z.sum().backward()
    assert torch.allclose(mu.grad, torch.ones_like(mu))
    assert torch.allclose(logvar.grad, 0.5 * 0.3 * eps, atol=1e-6)  # d/dlv exp(lv/2) eps
    with pytest.raises(ValueError, match="logvar is required"):
        vae.posterior_std(None)


def test_kl_matches_torch_distributions():
    g = torch.Generator().manual_seed(2)
    mu = torch.randn(3, 8, 4, 4, generator=g)
    logvar = torch.randn(3, 8, 4, 4, generator=g)
    learned = VAE(tiny_cfg(posterior="learned"), 32)
    ref = kl_divergence(Normal(mu, torch.exp(0.5 * logvar)), Normal(0.0, 1.0)).flatten(1).sum(1)
    got = learned.kl(mu, logvar)
    assert got.shape == (3,)
    assert torch.allclose(got, ref, rtol=1e-5, atol=1e-4)
    fixed = VAE(tiny_cfg(posterior_std=0.5), 32)
    ref_fixed = kl_divergence(Normal(mu, torch.full_like(mu, 0.5)), Normal(0.0, 1.0)).flatten(1).sum(1)
    assert torch.allclose(fixed.kl(mu, None), ref_fixed, rtol=1e-5, atol=1e-4)
    # at mu = 0 the fixed-std KL is the constant d/2 (s^2 - 1 - ln s^2)
    d = 8 * 4 * 4
    const = 0.5 * d * (0.25 - 1 - math.log(0.25))
    assert torch.allclose(fixed.kl(torch.zeros(1, 8, 4, 4), None), torch.tensor([const]))


def test_learned_logvar_is_clamped():
    vae = VAE(tiny_cfg(posterior="learned"), 32)
    with torch.no_grad():
        vae.quant_conv.bias[8:] = 1e4  # log-variance half
        vae.quant_conv.bias[:8] = 0.0
    _, logvar = vae.encode(torch.zeros(1, 3, 32, 32))
    assert torch.all(logvar <= 20.0) and logvar.max().item() == 20.0
    with torch.no_grad():
        vae.quant_conv.bias[8:] = -1e4
    _, logvar = vae.encode(torch.zeros(1, 3, 32, 32))
    assert logvar.min().item() == -30.0


def test_attn_block_matches_explicit_softmax_attention():
    torch.manual_seed(3)
    blk = AttnBlock(16, norm_groups=4)
    x = torch.randn(2, 16, 3, 5)
    h = blk.norm(x)
    q, k, v = (c(h).flatten(2).transpose(1, 2) for c in (blk.q, blk.k, blk.v))  # (B, HW, C)
    w = torch.softmax(q @ k.transpose(1, 2) / math.sqrt(16), dim=-1)
    out = (w @ v).transpose(1, 2).reshape(2, 16, 3, 5)
    ref = x + blk.proj_out(out)
    assert torch.allclose(blk(x), ref, atol=1e-5)


def test_resample_and_resnet_blocks():
    torch.manual_seed(4)
    down = Downsample(4)
    x = torch.randn(1, 4, 8, 8)
    y = down(x)
    assert y.shape == (1, 4, 4, 4)
    # asymmetric padding: output pixel (0, 0) sees input rows/cols 0..2 only (no padding on top/left)
    ref00 = (down.conv.weight * x[:, :, 0:3, 0:3]).sum(dim=(1, 2, 3)) + down.conv.bias
    assert torch.allclose(y[0, :, 0, 0], ref00, atol=1e-5)
    up = Upsample(4)
    assert up(x).shape == (1, 4, 16, 16)
    rb = ResnetBlock(8, 16, norm_groups=4)
    assert rb(torch.randn(2, 8, 5, 5)).shape == (2, 16, 5, 5)
    assert isinstance(rb.skip, torch.nn.Conv2d) and rb.skip.kernel_size == (1, 1)
    same = ResnetBlock(8, 8, norm_groups=4)
    assert isinstance(same.skip, torch.nn.Identity)
    with torch.no_grad():  # zero residual branch -> identity
        same.conv2.weight.zero_()
        same.conv2.bias.zero_()
    z = torch.randn(1, 8, 4, 4)
    assert torch.equal(same(z), z)


def test_bad_configs_name_the_key():
    with pytest.raises(ValueError, match="model.vae.norm_groups"):
        VAE(tiny_cfg(norm_groups=12), 32)
    with pytest.raises(ValueError, match="model.resolution"):
        VAE(tiny_cfg(), 30)
    with pytest.raises(ValueError, match="model.vae.posterior"):
        VAE(tiny_cfg(posterior="beta"), 32)
    vae = VAE(tiny_cfg(), 32)
    with pytest.raises(ValueError, match="divisible by 4"):
        vae.encode(torch.zeros(1, 3, 30, 32))
    with pytest.raises(ValueError, match="VAE.decode"):
        vae.decode(torch.zeros(1, 4, 8, 8))


def test_tiny_vae_learns_to_reconstruct():
    """A few Adam steps on one real-looking batch lower the L1 reconstruction error (gradients reach every part)."""
    torch.manual_seed(5)
    vae = VAE(tiny_cfg(base_channels=16, ch_mult=[1, 2], norm_groups=4), 16)
    yy, xx = torch.meshgrid(torch.linspace(-1, 1, 16), torch.linspace(-1, 1, 16), indexing="ij")
    x = torch.stack([torch.stack([xx, yy, xx * yy]), torch.stack([-yy, xx.abs() * 2 - 1, torch.sin(3 * xx)])])
    opt = torch.optim.Adam(vae.parameters(), lr=2e-3)
    g = torch.Generator().manual_seed(0)
    losses = []
    for _ in range(25):
        mu, lv = vae.encode(x)
        x_hat = vae.decode(vae.reparameterize(mu, lv, torch.randn(mu.shape, generator=g)))
        loss = F.l1_loss(x_hat, x)
        opt.zero_grad()
        loss.backward()
        assert vae.encoder.conv_in.weight.grad.abs().sum() > 0
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0], losses
