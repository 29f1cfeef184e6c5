"""Losses and frozen teachers (method §5.2, §5.3, §6.1, §11.4): PatchGAN, hinge, adaptive GAN weight, LPIPS,
DINOv2 teacher, REPA projector and loss."""

import math
import os
import socket

import pytest
import torch
import torch.nn.functional as F

from simflow.config import PerceptualConfig, REPAConfig
from simflow.losses.gan import generator_adv_loss, hinge_d_loss
from simflow.losses.perceptual import LPIPSLoss, build_perceptual
from simflow.losses.teacher import build_teacher, repa_loss, resample_token_grid
from simflow.models.repa import REPAProjector
from simflow.losses.weights import WeightsNotFoundError
from simflow.models.discriminator import NLayerDiscriminator


# ----------------------------------------------------------------------------------------------------------- GAN
def test_patchgan_shapes_norms_and_init():
    torch.manual_seed(0)
    d = NLayerDiscriminator(in_channels=3, ndf=64, n_layers=3, norm="batch")
    assert d(torch.randn(2, 3, 64, 64)).shape == (2, 1, 6, 6)  # 64 -> 32 -> 16 -> 8 -> 7 -> 6
    assert d(torch.randn(2, 3, 32, 32)).shape == (2, 1, 2, 2)
    convs = [m for m in d.modules() if isinstance(m, torch.nn.Conv2d)]
    assert [c.out_channels for c in convs] == [64, 128, 256, 512, 1]
    assert [c.stride for c in convs] == [(2, 2), (2, 2), (2, 2), (1, 1), (1, 1)]
    assert [c.bias is not None for c in convs] == [True, False, False, False, True]
    w = torch.cat([c.weight.flatten() for c in convs[1:4]])
    assert abs(w.std().item() - 0.02) < 1e-3 and abs(w.mean().item()) < 1e-3
    bn = [m for m in d.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    assert len(bn) == 3 and abs(torch.cat([b.weight for b in bn]).mean().item() - 1.0) < 5e-3
    g = NLayerDiscriminator(ndf=16, n_layers=2, norm="group")
    assert g(torch.randn(1, 3, 32, 32)).shape == (1, 1, 6, 6)
    assert sum(isinstance(m, torch.nn.GroupNorm) for m in g.modules()) == 2
    n = NLayerDiscriminator(ndf=8, n_layers=3, norm="none")
    assert all(c.bias is not None for c in n.modules() if isinstance(c, torch.nn.Conv2d))
    with pytest.raises(ValueError, match="loss.gan.norm"):
        NLayerDiscriminator(norm="instance")


def test_hinge_losses_on_hand_made_logits():
    real = torch.tensor([2.0, 0.5, -1.0])
    fake = torch.tensor([-2.0, 0.0, 1.0])
    # relu(1 - real) = [0, .5, 2] -> mean 5/6 ; relu(1 + fake) = [0, 1, 2] -> mean 1
    assert hinge_d_loss(real, fake).item() == pytest.approx(0.5 * (5 / 6 + 1.0), abs=1e-6)
    assert hinge_d_loss(torch.full((2, 1, 3, 3), 1.5), torch.full((2, 1, 3, 3), -1.2)).item() == 0.0
    assert generator_adv_loss(fake).item() == pytest.approx(1 / 3, abs=1e-6)
    assert generator_adv_loss(torch.full((4, 1, 2, 2), -0.25)).item() == pytest.approx(0.25)


# ----------------------------------------------------------------------------------------------------------- LPIPS
@pytest.fixture(scope="module")
def vgg_files(tmp_path_factory):
    """A random torchvision vgg16 state dict saved as .pth and .safetensors (trunk + one classifier tensor)."""
    import torchvision
    from safetensors.torch import save_file

    torch.manual_seed(0)
    vgg = torchvision.models.vgg16(weights=None)
    sd = {k: v.clone() for k, v in vgg.state_dict().items() if k.startswith("features.") or k == "classifier.6.bias"}
    d = tmp_path_factory.mktemp("vgg")
    pth, st = str(d / "vgg16.pth"), str(d / "vgg16.safetensors")
    torch.save(sd, pth)
    save_file(sd, st)
    return vgg, pth, st


@pytest.fixture(scope="module")
def perc_loaded(vgg_files):
    return build_perceptual(PerceptualConfig(weight=1.0, weights=vgg_files[1]))


def _images():
    g = torch.Generator().manual_seed(7)
    x = torch.rand(2, 3, 32, 32, generator=g) * 2 - 1
    y = (x + 0.3 * torch.randn(2, 3, 32, 32, generator=g)).clamp(-1, 1)
    return x, y


def _reference_lpips(vgg):
    """lpips.LPIPS whose trunk slices hold the torchvision vgg16 ``features`` modules themselves."""
    import lpips

    ref = lpips.LPIPS(net="vgg", pretrained=True, pnet_rand=True, verbose=False)
    for s in (ref.net.slice1, ref.net.slice2, ref.net.slice3, ref.net.slice4, ref.net.slice5):
        for name in list(s._modules):
            s._modules[name] = vgg.features[int(name)]
    return ref.eval()


@pytest.mark.filterwarnings("ignore::UserWarning:torchvision")  # lpips passes torchvision's deprecated `pretrained`
def test_lpips_loads_torchvision_vgg16(vgg_files, monkeypatch):
    vgg, pth, st = vgg_files

    def no_network(*a, **k):
        raise AssertionError("LPIPS tried to open a network connection")

    monkeypatch.setattr(socket.socket, "connect", no_network)
    perc = build_perceptual(PerceptualConfig(weight=1.0, weights=pth))
    assert isinstance(perc, LPIPSLoss)
    x, y = _images()
    ref = _reference_lpips(vgg)
    with torch.no_grad():
        expect = ref(x, y).flatten()
        got = perc(x, y)
    assert got.shape == (2,)
    assert torch.equal(got, expect)
    got_st = build_perceptual(PerceptualConfig(weight=1.0, weights=st))(x, y)
    assert torch.equal(got_st.detach(), expect)
    # the linear heads are the package-shipped LPIPS v0.1 calibration
    import lpips

    heads = torch.load(os.path.join(os.path.dirname(lpips.__file__), "weights/v0.1/vgg.pth"), map_location="cpu",
                       weights_only=True)
    assert torch.equal(perc.lpips.lin2.model[1].weight, heads["lin2.model.1.weight"])


def test_lpips_values_gradients_and_frozen(perc_loaded):
    perc = perc_loaded
    x, y = _images()
    assert torch.equal(perc(x, x), torch.zeros(2))
    d = perc(x, y)
    assert (d > 0).all()
    assert perc(x, -x).min() > 0
    assert all(not p.requires_grad for p in perc.parameters())
    perc.train()
    assert not perc.training and not perc.lpips.training
    y = y.clone().requires_grad_(True)
    perc(x, y).sum().backward()
    assert y.grad.abs().sum() > 0


def test_lpips_random_init_and_errors(tmp_path, perc_loaded, caplog):
    assert build_perceptual(PerceptualConfig(weight=0.0, weights=None)) is None
    missing = str(tmp_path / "nope" / "vgg16.pth")
    with pytest.raises(FileNotFoundError, match="torchvision VGG16 weights for LPIPS") as e:
        build_perceptual(PerceptualConfig(weight=1.0, weights=missing))
    assert missing in str(e.value) and "loss.perceptual.weights" in str(e.value)
    with pytest.raises(WeightsNotFoundError, match="torchvision VGG16 weights for LPIPS.*loss.perceptual.weights"):
        build_perceptual(PerceptualConfig(weight=1.0, weights=None))
    bad = tmp_path / "bn.pth"
    torch.save({"features.0.weight": torch.zeros(64, 3, 3, 3), "features.1.running_mean": torch.zeros(64)}, bad)
    with pytest.raises(ValueError, match="bn.pth.*not a torchvision vgg16"):
        build_perceptual(PerceptualConfig(weight=1.0, weights=str(bad)))
    with caplog.at_level("WARNING"):
        rnd = build_perceptual(PerceptualConfig(weight=1.0, random_init=True))
    assert "RANDOMLY initialised" in caplog.text
    x, y = _images()
    assert not torch.allclose(rnd(x, y), perc_loaded(x, y))  # loading really replaced the random trunk


# ----------------------------------------------------------------------------------------------------------- DINOv2
TINY_VIT = dict(embed_dim=64, depth=2, num_heads=2)


def _tiny_vit(img_size, seed=0):
    import timm

    torch.manual_seed(seed)
    vit = timm.create_model("vit_small_patch14_dinov2", pretrained=False, img_size=img_size, **TINY_VIT)
    with torch.no_grad():  # move every tensor away from its init so a fresh model cannot pass for the loaded one
        for p in vit.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return vit.eval()


def _repa_cfg(path, res=56, **kw):
    args = dict(enabled=True, teacher_arch="vit_small_patch14_dinov2", teacher_weights=path, teacher_resolution=res,
                teacher_kwargs=dict(TINY_VIT), teacher_dim=64)
    return REPAConfig(**{**args, **kw})


def test_dinov2_teacher_reproduces_saved_model(tmp_path):
    from safetensors.torch import save_file

    src = _tiny_vit(56)
    pth, st = str(tmp_path / "dino.pth"), str(tmp_path / "dino.safetensors")
    torch.save(src.state_dict(), pth)
    save_file({k: v.contiguous() for k, v in src.state_dict().items()}, st)
    teacher = build_teacher(_repa_cfg(pth))
    assert teacher.grid_size == (4, 4) and teacher.embed_dim == 64
    g = torch.Generator().manual_seed(1)
    x = torch.rand(2, 3, 64, 64, generator=g) * 2 - 1  # resized to 56 inside
    mean = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
    std = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)
    xin = (F.interpolate(x / 2 + 0.5, size=(56, 56), mode="bicubic", align_corners=False) - mean) / std
    with torch.no_grad():
        expect = src.forward_features(xin)[:, 1:]  # drop the cls token
    got = teacher(x)
    assert got.shape == (2, 16, 64) and not got.requires_grad
    assert torch.allclose(got, expect, atol=1e-5)
    assert torch.allclose(build_teacher(_repa_cfg(st))(x), expect, atol=1e-5)
    assert all(not p.requires_grad for p in teacher.parameters())
    teacher.train()
    assert not teacher.vit.training


def test_dinov2_release_format_and_grid_resampling(tmp_path):
    """Original DINOv2 files carry ``mask_token`` and a pos-embed for another grid; both are converted by timm."""
    src = _tiny_vit(42)  # 3x3 patch grid
    sd = dict(src.state_dict())
    sd["mask_token"] = torch.zeros(1, 64)
    path = str(tmp_path / "dinov2_release.pth")
    torch.save(sd, path)
    teacher = build_teacher(_repa_cfg(path, res=56))  # 4x4 grid
    assert teacher.vit.pos_embed.shape == (1, 1 + 16, 64)
    assert torch.equal(teacher.vit.blocks[1].attn.qkv.weight, src.blocks[1].attn.qkv.weight)
    assert teacher(torch.zeros(1, 3, 56, 56)).shape == (1, 16, 64)


def test_dinov2_errors_and_random_init(tmp_path, caplog):
    assert build_teacher(REPAConfig(enabled=False)) is None
    missing = str(tmp_path / "dinov2_vitb14.pth")
    with pytest.raises(FileNotFoundError, match="DINOv2 weights") as e:
        build_teacher(_repa_cfg(missing))
    assert missing in str(e.value) and "loss.repa.teacher_weights" in str(e.value)
    with pytest.raises(WeightsNotFoundError, match="DINOv2 weights"):
        build_teacher(_repa_cfg(None))
    path = str(tmp_path / "deeper.pth")
    import timm

    torch.save(timm.create_model("vit_small_patch14_dinov2", pretrained=False, img_size=56, embed_dim=64, depth=3,
                                 num_heads=2).state_dict(), path)
    with pytest.raises(ValueError, match="deeper.pth.*unexpected"):
        build_teacher(_repa_cfg(path))  # depth 3 file into a depth-2 model
    with caplog.at_level("WARNING"):
        t = build_teacher(_repa_cfg(None, random_init=True))
    assert "RANDOMLY initialised" in caplog.text and t(torch.zeros(1, 3, 56, 56)).shape == (1, 16, 64)
    with pytest.raises(ValueError, match="loss.repa.teacher_dim=768"):
        build_teacher(_repa_cfg(None, random_init=True, teacher_dim=768))


# ----------------------------------------------------------------------------------------------------------- REPA
def test_repa_projector_shapes_and_params():
    p = REPAProjector(48, hidden=32, out_dim=24)
    assert p(torch.randn(2, 5, 48)).shape == (2, 5, 24)
    assert sum(q.numel() for q in p.parameters()) == 48 * 32 + 32 + 32 * 32 + 32 + 32 * 24 + 24
    assert sum(isinstance(m, torch.nn.SiLU) for m in p.modules()) == 2


def test_repa_loss_values():
    g = torch.Generator().manual_seed(3)
    a = torch.randn(2, 4, 8, generator=g)
    assert repa_loss(a, a).item() == pytest.approx(-1.0, abs=1e-6)
    assert repa_loss(-a, a).item() == pytest.approx(1.0, abs=1e-6)
    assert repa_loss(3.0 * a, 0.5 * a).item() == pytest.approx(-1.0, abs=1e-6)  # scale invariant
    e0, e1 = torch.eye(8)[0], torch.eye(8)[1]
    assert repa_loss(e0.expand(1, 4, 8), e1.expand(1, 4, 8)).item() == pytest.approx(0.0, abs=1e-7)
    # hand-computed: tokens at 0 and 60 degrees -> cos 1 and 0.5 -> loss -(1 + 0.5)/2
    p = torch.tensor([[[1.0, 0.0], [1.0, 0.0]]])
    t = torch.tensor([[[2.0, 0.0], [0.5, math.sqrt(3) / 2]]])
    assert repa_loss(p, t).item() == pytest.approx(-0.75, abs=1e-6)
    b = torch.randn(2, 4, 8, generator=g, requires_grad=True)
    repa_loss(b, a).backward()
    assert b.grad.abs().sum() > 0


def test_token_grid_resampling():
    grid = torch.arange(16.0).reshape(1, 16, 1)  # 4x4 raster grid, one channel
    down = resample_token_grid(grid, 4)
    # bilinear 4x4 -> 2x2 (align_corners=False) samples at the centres of 2x2 blocks: their means
    assert torch.allclose(down.flatten(), torch.tensor([2.5, 4.5, 10.5, 12.5]))
    assert resample_token_grid(torch.ones(2, 4, 3), 16).shape == (2, 16, 3)
    assert torch.equal(resample_token_grid(grid, 16), grid)
    with pytest.raises(ValueError, match="square"):
        resample_token_grid(torch.ones(1, 12, 3), 4)
    # repa_loss resamples a 4x4 teacher grid to the flow's 2x2 token grid
    g = torch.Generator().manual_seed(4)
    coarse = torch.randn(1, 4, 8, generator=g)  # 2x2 grid
    fine = coarse.reshape(1, 2, 2, 8).repeat_interleave(2, 1).repeat_interleave(2, 2).reshape(1, 16, 8)
    assert torch.allclose(resample_token_grid(fine, 4), coarse, atol=1e-6)
    assert repa_loss(coarse, fine).item() == pytest.approx(-1.0, abs=1e-6)
