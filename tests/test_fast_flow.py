"""The fast training path of the flow (issue 14 parts 2-4): fused QKV layout and legacy-weight conversion,
torch.compile == eager with no graph breaks, activation checkpointing == plain (bit-equal on CPU)."""

import math
import os

import pytest
import torch

from simflow.config import ConfigError, FlowConfig, load_config, validate
from simflow.models.flow import Attention, TransformerFlow, convert_legacy_qkv
from simflow.models.layers import DenseLinearFactory, attention, gated_residual, modulate
from simflow.models.simflow import SimFlowModel
from simflow.parallel.parallelize import apply_activation_checkpointing, apply_compile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = os.path.join(ROOT, "configs", "tiny.yaml")


def _unfuse(w: torch.Tensor, head_dim: int):
    """Test-side inverse of the documented layout: rows [3 h hd, 3 (h+1) hd) = head h's q, k, v rows."""
    heads = w.shape[0] // (3 * head_dim)
    per_head = w.reshape(heads, 3, head_dim, *w.shape[1:])
    return [per_head[:, j].reshape(heads * head_dim, *w.shape[1:]) for j in range(3)]


def _legacy_state(state, head_dim):
    out = {}
    for k, v in state.items():
        if ".qkv." in k or k.startswith("qkv."):
            pre, kind = k.rsplit("qkv.", 1)
            for name, part in zip("qkv", _unfuse(v, head_dim)):
                out[f"{pre}{name}.{kind}"] = part.clone()
        else:
            out[k] = v
    return out


@pytest.mark.parametrize("causal", [True, False])
def test_cpu_bf16_attention_is_the_fp32_attention_of_the_bf16_inputs(causal):
    """Under bf16 autocast on CPU, ``layers.attention`` computes in fp32 and rounds once: output and input gradients
    are bit-equal to fp32 SDPA on the (bf16-exact) inputs, cast to bf16; in fp32 it is SDPA itself."""
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 3, 17, 8, generator=g).bfloat16().requires_grad_() for _ in range(3))
    grad_out = torch.randn(2, 3, 17, 8, generator=g).bfloat16()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = attention(q, k, v, is_causal=causal)
    out.backward(grad_out)
    assert out.dtype == torch.bfloat16 and q.grad.dtype == torch.bfloat16
    q32, k32, v32 = (t.detach().float().requires_grad_() for t in (q, k, v))
    ref = torch.nn.functional.scaled_dot_product_attention(q32, k32, v32, is_causal=causal)
    ref.backward(grad_out.float())
    assert torch.equal(out, ref.bfloat16())
    for got, want in ((q.grad, q32.grad), (k.grad, k32.grad), (v.grad, v32.grad)):
        assert torch.equal(got, want.bfloat16())
    # fp32 inputs: plain SDPA (no cast)
    assert torch.equal(attention(q32.detach(), k32.detach(), v32.detach(), is_causal=causal),
                       torch.nn.functional.scaled_dot_product_attention(q32.detach(), k32.detach(), v32.detach(),
                                                                        is_causal=causal))


def test_adaln_backward_passes_gradcheck_and_match_autograd_of_the_plain_math():
    """``modulate`` and ``gated_residual`` have hand-written backwards: fp64 gradcheck and gradgradcheck (central
    differences, so double backward is exact too) and, with autocast's dtype mix (fp32 activations, bf16
    modulation), output and gradients bit-equal, in the same dtypes, to autograd of the ``addcmul`` forms
    ``addcmul(shift, x, 1 + scale)`` and ``addcmul(x, gate, y)``."""
    g = torch.Generator().manual_seed(0)
    x, y = (torch.randn(3, 5, 4, generator=g, dtype=torch.float64, requires_grad=True) for _ in range(2))
    a, b = (torch.randn(3, 4, generator=g, dtype=torch.float64, requires_grad=True) for _ in range(2))
    for fn, args in ((modulate, (x, a, b)), (gated_residual, (x, a, y))):
        assert torch.autograd.gradcheck(fn, args)
        assert torch.autograd.gradgradcheck(fn, args)
    x32, y16 = torch.randn(4, 6, 8, generator=g), torch.randn(4, 6, 8, generator=g).bfloat16()
    a16, b16 = torch.randn(4, 8, generator=g).bfloat16(), torch.randn(4, 8, generator=g).bfloat16()
    grad = torch.randn(4, 6, 8, generator=g)
    for fn, plain, inputs in (
        (modulate, lambda x, s, c: torch.addcmul(s.unsqueeze(1), x, 1 + c.unsqueeze(1)), (x32, a16, b16)),
        (gated_residual, lambda x, gt, y: torch.addcmul(x, gt.unsqueeze(1), y), (x32, a16, y16)),
    ):
        mine = [t.clone().requires_grad_() for t in inputs]
        theirs = [t.clone().requires_grad_() for t in inputs]
        out, ref = fn(*mine), plain(*theirs)
        assert out.dtype == ref.dtype == torch.float32 and torch.equal(out, ref)
        out.backward(grad)
        ref.backward(grad)
        for m, t in zip(mine, theirs):
            assert m.grad.dtype == t.grad.dtype == t.dtype and torch.equal(m.grad, t.grad)


def test_adaln_backward_skips_gradients_nobody_needs():
    """The hand-written backwards compute only the gradients autograd asks for (``ctx.needs_input_grad``): called
    directly with one input marked as not needing a gradient, that slot is None and the others are unchanged."""
    from types import SimpleNamespace

    from simflow.models.layers import _GatedResidual, _Modulate

    g = torch.Generator().manual_seed(1)
    x, y, grad = (torch.randn(2, 3, 4, generator=g) for _ in range(3))
    a, b = torch.randn(2, 4, generator=g), torch.randn(2, 4, generator=g)
    cases = ((_Modulate, (x, b), {"shift_dtype": a.dtype}), (_GatedResidual, (a, y), {"x_dtype": x.dtype}))
    for fn, saved, extra in cases:
        full = fn.backward(SimpleNamespace(saved_tensors=saved, needs_input_grad=(True, True, True), **extra), grad)
        for skip in range(3):
            needs = tuple(i != skip for i in range(3))
            part = fn.backward(SimpleNamespace(saved_tensors=saved, needs_input_grad=needs, **extra), grad)
            assert part[skip] is None
            assert all(torch.equal(p, f) for i, (p, f) in enumerate(zip(part, full)) if i != skip)


def test_legacy_qkv_weights_compute_standard_attention():
    """Separate q/k/v weights loaded through the pre-hook give softmax(q k^T / sqrt(hd) + causal) v, head by head
    (the attention written out here without the module), so the fused layout is the one documented."""
    torch.manual_seed(0)
    dim, hd, b, t = 24, 8, 2, 5
    attn = Attention(dim, hd, DenseLinearFactory())
    wq, wk, wv, wo = (torch.randn(dim, dim) * 0.3 for _ in range(4))
    bq, bk, bv, bo = (torch.randn(dim) * 0.1 for _ in range(4))
    attn.load_state_dict({"q.weight": wq, "q.bias": bq, "k.weight": wk, "k.bias": bk, "v.weight": wv,
                          "v.bias": bv, "out.weight": wo, "out.bias": bo})
    x = torch.randn(b, t, dim)
    q, k, v = (x @ w.T + bias for w, bias in ((wq, bq), (wk, bk), (wv, bv)))
    heads = []
    for h in range(dim // hd):
        s = slice(h * hd, (h + 1) * hd)
        logits = q[..., s] @ k[..., s].transpose(1, 2) / math.sqrt(hd)
        logits = logits.masked_fill(torch.ones(t, t, dtype=torch.bool).triu(1), float("-inf"))
        heads.append(logits.softmax(-1) @ v[..., s])
    want = torch.cat(heads, -1) @ wo.T + bo
    torch.testing.assert_close(attn(x), want, rtol=1e-5, atol=1e-5)


def test_fused_init_draws_the_unfused_weights():
    """qkv_init consumes the RNG like three separate Xavier q, k, v layers: same seed, same q/k/v matrices."""
    dim, hd = 32, 8
    torch.manual_seed(3)
    attn = Attention(dim, hd, DenseLinearFactory())
    torch.manual_seed(3)
    want = [torch.nn.init.xavier_uniform_(torch.empty(dim, dim)) for _ in range(3)]
    for got, w in zip(_unfuse(attn.qkv.weight.detach(), hd), want):
        assert torch.equal(got, w)


def test_heads_not_divisible_by_tp_is_refused():
    class TwoWay(DenseLinearFactory):
        tp_size = 4

    with pytest.raises(ValueError, match="3 attention heads .* tensor-parallel size 4"):
        Attention(24, 8, TwoWay())


def test_convert_legacy_qkv_names_missing_key():
    state = {"flow.blocks.0.layers.0.attn.q.weight": torch.zeros(8, 8),
             "flow.blocks.0.layers.0.attn.k.weight": torch.zeros(8, 8)}
    with pytest.raises(KeyError, match="attn.v.weight"):
        convert_legacy_qkv(state, 4)
    same = {"a.qkv.weight": torch.zeros(3, 1)}
    assert convert_legacy_qkv(same, 1) is same


def test_export_from_before_fused_qkv_loads_and_samples_the_same(tmp_path):
    """An export written with separate attn.q/k/v keys (pre-fusion layout) loads through load_generator (the path
    of simflow.sample and the eval tools) and samples exactly what the fused model samples."""
    from safetensors.torch import save_file

    from simflow.eval.weights import load_generator
    from simflow.models.flow import Guidance

    cfg = load_config(TINY)
    torch.manual_seed(0)
    model = SimFlowModel(cfg).eval()
    with torch.no_grad():
        for p in model.flow.parameters():
            if p.abs().sum() == 0:
                p.normal_(std=0.05)
    legacy = _legacy_state(model.state_dict(), cfg.model.flow.head_dim)
    assert "flow.blocks.0.layers.0.attn.q.weight" in legacy and not any(".qkv." in k for k in legacy)
    path = str(tmp_path / "old.safetensors")
    save_file({k: v.contiguous() for k, v in legacy.items()}, path, metadata={"step": "1"})
    loaded, _ = load_generator(path, cfg)
    y = torch.tensor([0, 3, 9])
    noise = torch.randn(3, model.flow.num_tokens, model.flow.token_dim)
    g = Guidance(1.5, "deep_only")
    a, b = model.sample(y, noise, g), loaded.sample(y, noise, g)
    assert a.abs().max() > 0.1
    assert torch.equal(a, b)


# ------------------------------------------------------------------------------------------------------------------
def _tiny_flow(seed=0):
    torch.manual_seed(seed)
    cfg = FlowConfig(width=32, num_blocks=2, layers_per_block=[1, 2], head_dim=8, num_classes=5, patch_size=1)
    flow = TransformerFlow(cfg, in_channels=4, latent_size=4)
    with torch.no_grad():  # off the identity init so that every parameter gets a gradient
        for p in flow.parameters():
            if p.abs().sum() == 0:
                p.normal_(std=0.05)
    return flow


def _flow_steps(flow, steps, batches):
    opt = torch.optim.AdamW(flow.parameters(), lr=1e-3)
    losses, grads = [], []
    for z, y in batches[:steps]:
        zk, log_det, _ = flow(z, y)
        loss = flow.nll_loss(zk, log_det).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        grads.append({n: p.grad.clone() for n, p in flow.named_parameters()})
        losses.append(loss.detach())
        opt.step()
    return torch.stack(losses), grads


def test_flow_forward_has_no_graph_breaks():
    flow = _tiny_flow()
    z, y = torch.randn(2, 4, 4, 4), torch.tensor([1, 5])
    explained = torch._dynamo.explain(flow)(z, y)
    assert explained.graph_break_count == 0, explained.break_reasons
    assert explained.graph_count == 1


@pytest.mark.slow  # inductor's C++ compilation of the layer and VAE graphs: ~1-2 min on 2 cores
def test_compiled_flow_and_vae_equal_eager():
    """3 AdamW steps of the flow NLL, compiled (apply_compile: flow + VAE) vs eager: losses within 1e-5 relative,
    gradients within 1e-5 (relative to the largest); and the compiled VAE's encode/decode equal eager."""
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()  # earlier tests in this process may have compiled graphs of their own
    batches = [(torch.randn(4, 4, 4, 4), torch.tensor([0, 2, 4, 5])) for _ in range(3)]
    eager_loss, eager_grads = _flow_steps(_tiny_flow(), 3, batches)
    flow = _tiny_flow()
    assert apply_compile(flow) == 3  # one per transformer layer
    comp_loss, comp_grads = _flow_steps(flow, 3, batches)
    assert torch.all((comp_loss - eager_loss).abs() <= 1e-5 * eager_loss.abs()), (comp_loss, eager_loss)
    for ge, gc in zip(eager_grads, comp_grads):
        scale = max(g.abs().max() for g in ge.values())
        assert scale > 1e-3
        assert max((ge[n] - gc[n]).abs().max() for n in ge) <= 1e-5 * scale
    assert counters["stats"]["unique_graphs"] == 1  # the 3 layers share one compiled graph (no per-layer recompile)

    cfg = load_config(TINY, ["model.vae.base_channels=8", "model.vae.norm_groups=4"])
    torch.manual_seed(0)
    eager = SimFlowModel(cfg).vae
    torch.manual_seed(0)
    comp = SimFlowModel(cfg).vae
    assert apply_compile(comp) == 2
    x = torch.rand(2, 3, 32, 32) * 2 - 1
    (mu_e, _), (mu_c, _) = eager.encode(x), comp.encode(x)
    torch.testing.assert_close(mu_c, mu_e, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(comp.decode(mu_e), eager.decode(mu_e), rtol=1e-5, atol=1e-5)
    torch._dynamo.reset()


def test_compile_with_deepspeed_is_a_config_error():
    with pytest.raises(ConfigError, match="train.compile=True: is supported with parallel.engine=local or fsdp2 only"):
        load_config(TINY, ["train.compile=true", "parallel.engine=deepspeed"])
    validate(load_config(TINY, ["train.compile=true"]))
    validate(load_config(TINY, ["train.compile=true", "parallel.engine=fsdp2"]))


# ------------------------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def demo_npz(demo_data):
    return demo_data(128)[0]


def _trainer_run(tmp_path, demo_npz, *extra, steps=2):
    from simflow.train.trainer import Trainer

    cfg = load_config(TINY, ["data.source=npz", f"data.path={demo_npz}", f"train.out_dir={tmp_path}",
                             "logging.wandb=disabled", "train.sample_every=0", "train.micro_batch_size=8",
                             "loss.gan.start_step=0", *extra])
    tr = Trainer(cfg)
    it = iter(tr.loader)
    metrics = [tr.train_step(it) for _ in range(steps)]
    tr.micro_step(next(it))  # one more forward/backward: leaves this step's gradients in .grad
    return tr, metrics


def test_activation_checkpointing_is_bit_equal_to_the_plain_step(tmp_path, demo_npz):
    """The real trainer (joint loss, GAN on) with train.activation_checkpointing=true: every metric and the weights
    after 2 AdamW steps, and the gradients of a third micro-batch, are bit-equal to the plain step; keys unchanged."""
    plain, m_plain = _trainer_run(tmp_path / "plain", demo_npz)
    ac, m_ac = _trainer_run(tmp_path / "ac", demo_npz, "train.activation_checkpointing=true")
    assert sum(getattr(m, "_activation_checkpointing", False) for m in ac.model.modules()) == 5  # [1,1,1,2]
    assert m_plain[-1]["nll"] != m_plain[0]["nll"]
    for a, b in zip(m_plain, m_ac):
        for k in ("loss", "nll", "rec", "log_det", "bits_per_dim", "grad_norm"):
            assert a[k] == b[k], (k, a[k], b[k])
    sa, sb = plain.model.state_dict(), ac.model.state_dict()
    assert list(sa) == list(sb)
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    pa, pb = dict(plain.model.named_parameters()), dict(ac.model.named_parameters())
    grads = [k for k in pa if pa[k].grad is not None and k.startswith("flow.")]
    assert len(grads) == len([k for k in pa if k.startswith("flow.")])
    assert max(pa[k].grad.abs().max() for k in grads) > 1e-3
    assert all(torch.equal(pa[k].grad, pb[k].grad) for k in grads)


def test_activation_checkpointing_keeps_sampling_and_no_grad_eager():
    flow = _tiny_flow()
    ref = _tiny_flow()
    assert apply_activation_checkpointing(flow) == 3
    assert apply_activation_checkpointing(flow) == 0  # idempotent
    noise = torch.randn(2, 16, 4)
    y = torch.tensor([1, 2])
    assert torch.equal(flow.inverse(noise, y), ref.inverse(noise, y))
    x = torch.randn(2, 4, 4, 4)
    with torch.no_grad():
        assert torch.equal(flow(x, y)[0], ref(x, y)[0])


@pytest.mark.slow  # DeepSpeed engine start-up (and, the first time, its shm op build)
def test_activation_checkpointing_under_deepspeed_zero3_is_bit_equal(tmp_path, demo_npz, monkeypatch):
    """One-process DeepSpeed ZeRO-3 engine: with train.activation_checkpointing the recomputation re-gathers the
    partitioned parameters; 2 steps give bit-equal metrics and bit-equal full weights."""
    from simflow.parallel.factory import build_engine
    from simflow.parallel.topology import destroy_topology, init_topology
    from simflow.train.trainer import Trainer

    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(k, raising=False)  # init_topology exports them: restored (absent) after the test
    res = {}
    for ac in (False, True):
        cfg = load_config(TINY, ["data.source=npz", f"data.path={demo_npz}", f"train.out_dir={tmp_path}/{ac}",
                                 "logging.wandb=disabled", "train.sample_every=0", "train.micro_batch_size=8",
                                 "loss.gan.start_step=0", "parallel.engine=deepspeed",
                                 f"train.activation_checkpointing={ac}"])
        topo = init_topology(cfg)
        try:
            tr = Trainer(cfg, topo, build_engine=build_engine)
            it = iter(tr.loader)
            res[ac] = ([tr.train_step_logged(it) for _ in range(2)], tr.gen.full_state_dict(ema=False))
        finally:
            destroy_topology(topo)
    (m0, w0), (m1, w1) = res[False], res[True]
    assert m0[1]["nll"] != m0[0]["nll"]
    for a, b in zip(m0, m1):
        for k in ("loss", "nll", "rec", "grad_norm"):
            assert a[k] == b[k], (k, a[k], b[k])
    assert sorted(w0) == sorted(w1) and all(torch.equal(w0[k], w1[k]) for k in w0)


@pytest.mark.parametrize("scale_param", ["softplus", "exp"])
@pytest.mark.parametrize("soft_clip", [4.0, 0.0])
def test_fused_affine_forward_equals_the_reference_math(scale_param, soft_clip):
    """The training path's affine map (:meth:`TransformerFlow._affine_forward`: one soft clip over ``[a | b]``,
    ``z = (x - b) / sigma``) equals ``_affine_params`` followed by ``(x - b) exp(-log sigma)`` on random inputs, values
    and gradients within 1e-6 relative, including large raw outputs where the clip saturates."""
    cfg = FlowConfig(width=32, num_blocks=2, layers_per_block=[1, 1], head_dim=16, num_classes=10, patch_size=1,
                     scale_param=scale_param, soft_clip=soft_clip)
    flow = TransformerFlow(cfg, in_channels=3, latent_size=4)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(5, 16, 3, generator=g)
    out = (torch.randn(5, 16, 6, generator=g) * torch.tensor([0.1, 1.0, 6.0, 0.5, 3.0, 20.0])).requires_grad_()
    z, ls = flow._affine_forward(x, out)
    a, b = out.chunk(2, dim=-1)
    ls_ref, b_ref = flow._affine_params(a, b)
    z_ref = (x - b_ref) * torch.exp(-ls_ref)
    torch.testing.assert_close(z, z_ref, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(ls, ls_ref, rtol=1e-6, atol=1e-6)
    w_z, w_ls = torch.randn_like(z), torch.randn_like(ls)
    (grad,) = torch.autograd.grad((z * w_z).sum() + (ls * w_ls).sum(), out)
    (grad_ref,) = torch.autograd.grad((z_ref * w_z).sum() + (ls_ref * w_ls).sum(), out)
    torch.testing.assert_close(grad, grad_ref, rtol=1e-6, atol=1e-6 * grad_ref.abs().max().item())
