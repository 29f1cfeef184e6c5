"""TarFlow/STARFlow-style autoregressive transformer flow over latent tokens (SimFlow method §4).

Notation (method §4.2-4.4): a latent ``(B, C_lat, H, W)`` is patchified into ``T = (H/p)(W/p)`` tokens of
``C = C_lat p^2`` channels, raster order. The flow is a stack of ``K`` autoregressive affine blocks
(``layers_per_block`` shallow blocks first, the deep block last). Block ``k`` permutes the sequence (identity for
even ``k``, reversed for odd ``k``), runs a causal transformer over ``[sos, x_0, ..., x_{T-2}]`` (STARFlow SOS
variant, method §4.3 step 2 / §12 #5), so the output at position ``t`` depends on ``x_{<t}`` only, and maps

    z_t = (x_t - b_t) / sigma_t,     log|det| = -sum_t,c log sigma_t,c               (method §4.3 step 6)

with ``sigma = softplus(a + 0.5413)`` (STARFlow; ``sigma = 1`` at ``a = 0``) or ``sigma = exp(a)`` (TarFlow),
where both head outputs are soft-clipped, ``a <- c tanh(a / c)`` and ``b <- c tanh(b / c)`` (STARFlow
``soft_clip``, method §4.3 step 6), so the log-scale and the shift are bounded. The affine map and log-det are
computed in fp32 whatever the autocast dtype. Class conditioning is DiT adaLN-Zero (6-way modulation per layer,
zero-initialised, method §4.3 step 3) with a null class ``num_classes`` for classifier-free guidance; the output
head is zero-initialised, so a fresh flow is the identity map (method §4.3 step 5).

Guidance at sampling time (method §7, :class:`Guidance`): ``linear`` (TarFlow linear guidance on the log-scale and
the shift, every block), ``gaussian`` (STARFlow product of Gaussians p_c^{1+w} / p_u^w, every block), ``deep_only``
(STARFlow ``cond_top_only``: linear guidance in the deep block, the shallow blocks run with the null class and
unguided) and ``deep_only_cond`` (linear guidance in the deep block, the shallow blocks with the conditional label).

No ``torch.distributed`` here: every linear layer is created by the linear-layer factory
(:mod:`simflow.models.layers`); tensor parallelism swaps the factory.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Dict, List, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from simflow.config import FlowConfig
from simflow.models.layers import (DenseLinearFactory, FP32LayerNorm, attention, gated_residual, modulate, xavier_init,
                                   zeros_init)

SOFTPLUS_SHIFT = 0.5413248546129181  # softplus(0.5413...) == 1 (STARFlow, method §4.3 step 6)
LOG_2PI = math.log(2 * math.pi)


def patchify(z: torch.Tensor, p: int) -> torch.Tensor:
    """(B, C, H, W) -> (B, T, C*p*p), T = (H/p)*(W/p), patches in raster order (method §4.2)."""
    b, c, h, w = z.shape
    z = z.reshape(b, c, h // p, p, w // p, p).permute(0, 2, 4, 1, 3, 5)
    return z.reshape(b, (h // p) * (w // p), c * p * p)


def unpatchify(x: torch.Tensor, p: int, channels: int, size: int) -> torch.Tensor:
    """Inverse of :func:`patchify`: (B, T, C*p*p) -> (B, C, size, size)."""
    b = x.shape[0]
    n = size // p
    x = x.reshape(b, n, n, channels, p, p).permute(0, 3, 1, 4, 2, 5)
    return x.reshape(b, channels, size, size)


GUIDANCE_MODES = ("linear", "gaussian", "deep_only", "deep_only_cond")


@dataclass
class Guidance:
    """Classifier-free guidance settings for :meth:`TransformerFlow.inverse` (method §7).

    ``scale`` is w (0 = no guidance: every block runs conditionally, the exact inverse of ``forward``). ``mode``:

    * ``linear``: TarFlow linear guidance in every block, on the log-scale and the shift after the soft clip,
      ``log sigma = ls_c + w (ls_c - ls_u)``, ``mu = mu_c + w (mu_c - mu_u)`` (TarFlow, arXiv 2412.06329, guides its
      log-scale ``a`` directly because sigma = exp(a); guiding log sigma gives the same strength under the softplus
      parametrisation).
    * ``gaussian``: STARFlow's product of Gaussians p_c^{1+w} / p_u^w in every block (arXiv 2506.06276).
    * ``deep_only``: STARFlow ``cond_top_only`` -- linear guidance in the deep (last) block only; the shallow blocks
      run with the null class and unguided (method §7 item 3).
    * ``deep_only_cond``: linear guidance in the deep block; the shallow blocks run with the conditional label (this
      project's behaviour before issue 15; kept for comparison, see docs/convergence.md).

    ``anneal`` ramps the weight over the token index t = 0 .. T-1 of a block (:meth:`weight`).
    """

    scale: float = 0.0
    mode: str = "deep_only"
    anneal: bool = False

    def __post_init__(self) -> None:
        if self.mode not in GUIDANCE_MODES:
            raise ValueError(f"guidance mode must be one of {', '.join(GUIDANCE_MODES)}, got {self.mode!r}")

    def block_role(self, block_index: int, num_blocks: int) -> str:
        """How block ``block_index`` (0 = first on the data side) of ``num_blocks`` runs at sampling time:
        ``"guided"`` (conditional and unconditional pass, combined), ``"cond"`` (the conditional label only) or
        ``"uncond"`` (the null class only)."""
        if self.scale == 0.0:
            return "cond"
        if self.mode in ("linear", "gaussian") or block_index == num_blocks - 1:
            return "guided"
        return "uncond" if self.mode == "deep_only" else "cond"

    def weight(self, t: int, num_tokens: int) -> float:
        """Guidance weight w_t for token ``t`` (0-based, in the block's order) of ``num_tokens`` T.

        Constant ``scale`` without ``anneal``. With ``anneal``: the linear modes use TarFlow's ramp
        (arXiv 2412.06329 FID script, method §7 item 1, ``g = w (i+1)/(T-1)`` for the token after the i-th), which in
        our indexing is ``w t / (T-1)``: 0 for the first token, ``w`` for the last; ``gaussian`` uses STARFlow's
        ``w (t+1) / T`` (method §7 item 2). T = 1 gives ``w``.
        """
        if not self.anneal:
            return self.scale
        if self.mode == "gaussian":
            return self.scale * (t + 1) / num_tokens
        return self.scale * t / (num_tokens - 1) if num_tokens > 1 else self.scale


def qkv_init(head_dim: int):
    """Initialiser for a fused QKV weight ``(3D, D)`` in the head-interleaved layout of :class:`Attention`.

    Draws q, k and v as three Xavier-uniform ``(D, D)`` matrices in that order (the RNG stream and values of three
    separate q/k/v layers) and interleaves them per head, so fused and unfused models built from one seed agree.
    """

    def init(w: torch.Tensor) -> None:
        three_d, d = w.shape
        parts = []
        for _ in range(3):
            m = torch.empty(d, d, dtype=w.dtype, device=w.device)
            xavier_init(m)
            parts.append(m)
        w.copy_(fuse_qkv(*parts, head_dim))

    return init


def fuse_qkv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, head_dim: int) -> torch.Tensor:
    """Separate q/k/v weights ``(D, D_in)`` (or biases ``(D,)``) -> one fused tensor ``(3D, ...)``, head-interleaved:
    rows ``[h*3*hd, (h+1)*3*hd)`` hold head ``h``'s q, k, v rows (``hd = head_dim``), so that any split of dim 0 into
    equal contiguous parts (megatron-core column parallelism over TP ranks) gives every rank whole heads of q, k, v.

    Raises:
        ValueError: q, k, v shapes differ or ``head_dim`` does not divide ``D``.
    """
    if not (q.shape == k.shape == v.shape) or q.shape[0] % head_dim:
        raise ValueError(f"fuse_qkv: q/k/v shapes {tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)} must be equal "
                         f"with dim 0 divisible by head_dim={head_dim}")
    heads = q.shape[0] // head_dim
    rest = q.shape[1:]
    return torch.stack([q, k, v]).reshape(3, heads, head_dim, *rest).transpose(0, 1).reshape(3 * q.shape[0], *rest)


def convert_legacy_qkv(state: Dict[str, torch.Tensor], head_dim: int) -> Dict[str, torch.Tensor]:
    """Rename weights saved before the fused QKV projection: every ``<prefix>attn.{q,k,v}.{weight,bias}`` triple
    becomes ``<prefix>attn.qkv.{weight,bias}`` (:func:`fuse_qkv` layout). Other keys pass through; a state without
    legacy keys is returned unchanged (same dict). Used by the weights loader (``simflow.eval.weights``) and by
    :class:`Attention`'s ``load_state_dict`` pre-hook.

    Raises:
        KeyError: a legacy triple is incomplete (names the missing key).
    """
    legacy = [k for k in state if k.endswith(".attn.q.weight") or k == "attn.q.weight" or k == "q.weight"]
    if not legacy:
        return state
    out = dict(state)
    for qw in legacy:
        prefix = qw[: -len("q.weight")]
        for kind in ("weight", "bias"):
            names = [f"{prefix}{n}.{kind}" for n in ("q", "k", "v")]
            present = [n in out for n in names]
            if not any(present):
                continue
            if not all(present):
                raise KeyError(f"legacy attention weights: {names[present.index(False)]!r} is missing "
                               f"(found {[n for n, ok in zip(names, present) if ok]})")
            out[f"{prefix}qkv.{kind}"] = fuse_qkv(*(out.pop(n) for n in names), head_dim)
    return out


class Attention(nn.Module):
    """Causal multi-head self-attention with one fused QKV projection and an optional KV cache.

    ``qkv`` is one "column" layer ``D -> 3D`` (one GEMM) whose output features are head-interleaved
    (:func:`fuse_qkv`): per head, its q, k and v features. Under tensor parallelism the column split of those
    features gives each rank whole heads, ``qkv.shape[-1] // (3 * head_dim)`` of them (the module infers the local
    head count from the output width); the output projection is a "row" layer. Weights saved with separate
    ``q``/``k``/``v`` layers load through a ``load_state_dict`` pre-hook (:func:`convert_legacy_qkv`).
    Shapes: x (B, T, D) -> (B, T, D). Scale 1/sqrt(head_dim) (method §4.3 step 4).

    Raises:
        ValueError: the head count ``D / head_dim`` is not divisible by the factory's ``tp_size``.
    """

    def __init__(self, dim: int, head_dim: int, linear_factory):
        super().__init__()
        if dim % head_dim:
            raise ValueError(f"model.flow.width={dim} must be a multiple of model.flow.head_dim={head_dim}")
        tp = int(getattr(linear_factory, "tp_size", 1))
        if (dim // head_dim) % tp:
            raise ValueError(f"{dim // head_dim} attention heads (width {dim} / head_dim {head_dim}) cannot be split "
                             f"over tensor-parallel size {tp}")
        self.head_dim = head_dim
        self.qkv = linear_factory(dim, 3 * dim, parallel="column", init_fn=qkv_init(head_dim))
        self.out = linear_factory(dim, dim, parallel="row", init_fn=xavier_init)
        self._register_load_state_dict_pre_hook(self._load_legacy_qkv)

    def _load_legacy_qkv(self, state_dict, prefix, *args) -> None:
        if prefix + "q.weight" in state_dict and prefix + "qkv.weight" not in state_dict:
            mine = {k[len(prefix):]: state_dict.pop(k) for k in [k for k in state_dict if k.startswith(prefix)]}
            state_dict.update({prefix + k: v for k, v in convert_legacy_qkv(mine, self.head_dim).items()})

    def forward(self, x: torch.Tensor, cache: Optional[Dict[str, torch.Tensor]] = None) -> torch.Tensor:
        b, t, _ = x.shape
        qkv = self.qkv(x)
        heads = qkv.shape[-1] // (3 * self.head_dim)
        # (B, T, H, 3, hd) -> three (B, H, T, hd) views, no copies. Unbinding dim 3 before transposing makes the
        # backward's stack write the (B, T, H, 3, hd) gradient layout directly (no extra copy into the qkv layout).
        q, k, v = (u.transpose(1, 2) for u in qkv.view(b, t, heads, 3, self.head_dim).unbind(3))
        if cache is None:
            o = attention(q, k, v, is_causal=True)
        else:
            # Incremental decoding into a preallocated buffer: the new tokens attend to every cached (earlier) token
            # and causally to each other.
            past = cache.get("len", 0)
            if "k" not in cache:
                shape = (b, heads, cache["capacity"], self.head_dim)
                cache["k"], cache["v"] = k.new_empty(shape), v.new_empty(shape)
            cache["k"][:, :, past : past + t] = k
            cache["v"][:, :, past : past + t] = v
            cache["len"] = past + t
            k, v = cache["k"][:, :, : past + t], cache["v"][:, :, : past + t]
            mask = None
            if t > 1:
                mask = torch.ones(t, past + t, dtype=torch.bool, device=x.device).tril(diagonal=past)
            o = attention(q, k, v, attn_mask=mask)
        return self.out(o.transpose(1, 2).reshape(b, t, heads * self.head_dim))


class MLP(nn.Module):
    """Linear D->hD ("column"), GELU (exact, erf form; method §4.3 step 4), Linear hD->D ("row").
    Shapes: (B, T, D) -> (B, T, D)."""

    def __init__(self, dim: int, hidden: int, linear_factory):
        super().__init__()
        self.up = linear_factory(dim, hidden, parallel="column", init_fn=xavier_init)
        self.down = linear_factory(hidden, dim, parallel="row", init_fn=xavier_init)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down(F.gelu(self.up(x)))


class TransformerLayer(nn.Module):
    """Pre-norm transformer layer with DiT adaLN-Zero conditioning (arXiv 2212.09748 §3.2; method §4.3 step 3).

    ``x + gate * Sublayer(LN(x) * (1 + scale) + shift)`` for attention and MLP; the 6-way modulation is a
    zero-initialised Linear(SiLU(c)), so a fresh layer is the identity.
    Shapes: x (B, T, D), c (B, D) -> (B, T, D).
    """

    def __init__(self, dim: int, head_dim: int, mlp_ratio: float, linear_factory):
        super().__init__()
        self.norm1 = FP32LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.attn = Attention(dim, head_dim, linear_factory)
        self.norm2 = FP32LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.mlp = MLP(dim, int(dim * mlp_ratio), linear_factory)
        self.ada = linear_factory(dim, 6 * dim, parallel="none", init_fn=zeros_init)

    def forward(self, x: torch.Tensor, c: torch.Tensor, cache: Optional[Dict] = None) -> torch.Tensor:
        if cache is not None and "mod" in cache:  # decoding: the modulation depends on c only, compute it once
            mod = cache["mod"]
        else:
            mod = self.ada(F.silu(c)).chunk(6, dim=-1)
            if cache is not None:
                cache["mod"] = mod
        sa, ca, ga, sm, cm, gm = mod
        x = gated_residual(x, ga, self.attn(modulate(self.norm1(x), sa, ca), cache))
        return gated_residual(x, gm, self.mlp(modulate(self.norm2(x), sm, cm)))


class FlowBlock(nn.Module):
    """One autoregressive affine flow block (method §4.3), operating on the already-permuted sequence.

    ``params(x_in, c)`` maps the shifted input ``[sos, x_0..x_{T-2}]`` (B, T, C) to raw (a, b), each (B, T, C),
    where position t depends on x_{<t} only.
    """

    def __init__(self, cfg: FlowConfig, token_dim: int, num_tokens: int, num_layers: int, linear_factory):
        super().__init__()
        d = cfg.width
        self.token_dim = token_dim
        self.proj_in = linear_factory(token_dim, d, parallel="none", init_fn=xavier_init)
        self.pos_emb = nn.Parameter(torch.empty(num_tokens, d))
        self.sos = nn.Parameter(torch.empty(1, 1, token_dim))
        self.layers = nn.ModuleList(
            [TransformerLayer(d, cfg.head_dim, cfg.mlp_ratio, linear_factory) for _ in range(num_layers)]
        )
        self.norm_out = FP32LayerNorm(d, elementwise_affine=False, eps=1e-6)
        self.ada_out = linear_factory(d, 2 * d, parallel="none", init_fn=zeros_init)
        self.head = linear_factory(d, 2 * token_dim, parallel="none", init_fn=zeros_init)
        with torch.no_grad():
            nn.init.normal_(self.pos_emb, std=0.01)  # method §4.3 step 2 (TarFlow init)
            nn.init.normal_(self.sos, std=0.02)

    def head_output(
        self,
        x_in: torch.Tensor,
        c: torch.Tensor,
        start: int = 0,
        caches: Optional[List[Dict]] = None,
        hidden_at: Optional[int] = None,
    ) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
        """Raw head output for positions ``start .. start + x_in.shape[1] - 1``.

        Args:
            x_in: (B, t, C) shifted inputs for those positions.
            c: (B, D) condition vector.
            caches: one dict per layer for incremental decoding, or None.
            hidden_at: 0-based layer index whose output hidden state (B, t, D) to return (REPA), or None.
        Returns:
            (out, hidden): ``out`` = ``[a | b]`` (B, t, 2C) in the autocast dtype (``a, b = out.chunk(2, -1)``,
            method §4.3); hidden or None.
        """
        t = x_in.shape[1]
        h = self.proj_in(x_in) + self.pos_emb[start : start + t]
        hidden = None
        for i, layer in enumerate(self.layers):
            h = layer(h, c, None if caches is None else caches[i])
            if hidden_at is not None and i == hidden_at:
                hidden = h
        shift, scale = self.ada_out(F.silu(c)).chunk(2, dim=-1)
        return self.head(modulate(self.norm_out(h), shift, scale)), hidden

    def shifted(self, x: torch.Tensor) -> torch.Tensor:
        """[sos, x_0, ..., x_{T-2}]: (B, T, C) -> (B, T, C)."""
        return torch.cat([self.sos.expand(x.shape[0], 1, -1).to(x.dtype), x[:, :-1]], dim=1)


class TransformerFlow(nn.Module):
    """The latent normalizing flow p_theta(z | y) (method §4).

    Args:
        cfg: :class:`simflow.config.FlowConfig`.
        in_channels: latent channels C_lat of the VAE.
        latent_size: latent height = width (e.g. 16 for f16 at 256 px).
        linear_factory: the linear-layer factory (default dense; the engine passes a tensor-parallel one).

    ``forward(z_img, y)`` goes data -> noise and returns ``(z, log_det, aux)``; ``inverse(noise, y, ...)`` goes
    noise -> data autoregressively with a KV cache (``use_cache=False`` recomputes the prefix each step).
    """

    def __init__(self, cfg: FlowConfig, in_channels: int, latent_size: int, linear_factory=None):
        super().__init__()
        linear_factory = linear_factory or DenseLinearFactory()
        if latent_size % cfg.patch_size:
            raise ValueError(f"model.flow.patch_size={cfg.patch_size} must divide the latent size {latent_size}")
        self.cfg = cfg
        self.in_channels = in_channels
        self.latent_size = latent_size
        self.patch_size = cfg.patch_size
        self.token_dim = in_channels * cfg.patch_size**2
        self.num_tokens = (latent_size // cfg.patch_size) ** 2
        self.num_classes = cfg.num_classes
        self.class_emb = nn.Embedding(cfg.num_classes + 1, cfg.width)  # index num_classes = null (CFG)
        with torch.no_grad():
            nn.init.normal_(self.class_emb.weight, std=0.02)
        self.blocks = nn.ModuleList(
            [FlowBlock(cfg, self.token_dim, self.num_tokens, n, linear_factory) for n in cfg.layers_per_block]
        )

    # ------------------------------------------------------------------------------------------------------
    @property
    def num_dims(self) -> int:
        """d = T * C latent dimensions per sample."""
        return self.num_tokens * self.token_dim

    @staticmethod
    def _permute(x: torch.Tensor, k: int) -> torch.Tensor:
        """Block k's order: identity for even k, reversed for odd k (method §4.3 step 1). Self-inverse."""
        return x.flip(1) if k % 2 else x

    def _affine_params(self, a: torch.Tensor, b: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """Raw (a, b) -> (log_sigma, b) in fp32, with the soft clip ``x <- c tanh(x / c)`` on both a and b
        (STARFlow ``soft_clip``, method §4.3 step 6; ``model.flow.soft_clip`` = c, 0 disables)."""
        a, b = self._soft_clip(a.float()), self._soft_clip(b.float())
        if self.cfg.scale_param == "softplus":
            log_sigma = torch.log(F.softplus(a + SOFTPLUS_SHIFT))
        else:
            log_sigma = a
        return log_sigma, b

    def _soft_clip(self, x: torch.Tensor) -> torch.Tensor:
        """``c tanh(x / c)`` with ``c = model.flow.soft_clip`` (0 = identity; STARFlow ``soft_clip``, method §4.3
        step 6), elementwise, any shape."""
        c = self.cfg.soft_clip
        return c * torch.tanh(x / c) if c > 0 else x

    def _affine_forward(self, xp: torch.Tensor, out: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """One block's affine map data -> noise from its raw head output (method §4.3 step 6), in fp32.

        The same math as :meth:`_affine_params` followed by ``z = (x - b) exp(-log sigma)``, in fewer kernels (the
        training hot path): the soft clip runs once over the contiguous ``[a | b]`` instead of twice over strided
        halves, and under the softplus parametrisation ``z = (x - b) / sigma`` skips the ``exp(-log sigma)``
        round trip (equal up to float rounding; pinned by ``tests/test_fast_flow.py``).

        Args:
            xp: (B, T, C) block input in the block's order, float32.
            out: (B, T, 2C) raw head output ``[a | b]`` (:meth:`FlowBlock.head_output`), any float dtype.
        Returns:
            zp: (B, T, C) float32; log_sigma: (B, T, C) float32.
        """
        a, b = self._soft_clip(out.float()).chunk(2, dim=-1)
        if self.cfg.scale_param == "softplus":
            sigma = F.softplus(a + SOFTPLUS_SHIFT)
            return (xp - b) / sigma, torch.log(sigma)
        return (xp - b) * torch.exp(-a), a

    def check_labels(self, y: torch.Tensor) -> None:
        """Validate labels at a data boundary, never inside :meth:`forward` (reading ``y`` on the host is a
        device-to-host sync and a ``torch.compile`` graph break). :meth:`inverse` calls it once per sampling call;
        training checks its data set's classes once at start (:class:`~simflow.train.trainer.Trainer`).

        Raises:
            ValueError: a label outside ``[0, num_classes]`` (``num_classes`` = null class), naming the values.
        """
        if y.numel() and (y.min() < 0 or y.max() > self.num_classes):
            raise ValueError(f"labels must be in [0, {self.num_classes}] ({self.num_classes} = null), got {y.tolist()}")

    def condition(self, y: torch.Tensor) -> torch.Tensor:
        """(B,) int64 labels in [0, num_classes] (num_classes = null) -> (B, D) condition vectors. Does not check
        the range (no host sync in the training step): see :meth:`check_labels`."""
        return self.class_emb(y)

    # ------------------------------------------------------------------------------------------------------
    def forward(
        self, z_img: torch.Tensor, y: torch.Tensor, hidden_layer: Optional[int] = None
    ) -> Tuple[torch.Tensor, torch.Tensor, Dict[str, torch.Tensor]]:
        """Data -> noise.

        Args:
            z_img: latent (B, C_lat, H, W), any float dtype.
            y: (B,) int64 class labels (``num_classes`` = null class).
            hidden_layer: 1-based global transformer layer (counted from the data side) whose hidden state to
                return for REPA, or None.
        Returns:
            z: (B, T, C) float32 noise-side tokens (should be N(0, I) after training).
            log_det: (B,) float32, sum over blocks, tokens and channels of log|dz/dx|, in nats.
            aux: ``block_outputs`` list of (B, T, C) (for the latent-norm regulariser) and, when requested,
                ``hidden`` (B, T, D) un-permuted to raster order (position t is the state that predicts token t).
        """
        c = self.condition(y)
        x = patchify(z_img, self.patch_size).float()
        log_det = torch.zeros(x.shape[0], device=x.device, dtype=torch.float32)
        aux: Dict[str, torch.Tensor] = {}
        outputs = []
        seen = 0
        for k, block in enumerate(self.blocks):
            xp = self._permute(x, k)
            want = None
            if hidden_layer is not None and seen < hidden_layer <= seen + len(block.layers):
                want = hidden_layer - seen - 1
            out, hidden = block.head_output(block.shifted(xp), c, hidden_at=want)
            zp, log_sigma = self._affine_forward(xp, out)
            log_det = log_det - log_sigma.sum(dim=(1, 2))
            x = self._permute(zp, k)
            outputs.append(x)
            if hidden is not None:
                aux["hidden"] = self._permute(hidden, k)
            seen += len(block.layers)
        aux["block_outputs"] = outputs
        return x, log_det, aux

    def nll_loss(self, z: torch.Tensor, log_det: torch.Tensor) -> torch.Tensor:
        """Per-sample TarFlow loss L_NF = 1/2 mean_dims(z^2) - log_det / d, in nats/dim **without** the
        1/2 log(2 pi) constant (method §4.4). Shapes: z (B, T, C), log_det (B,) -> (B,)."""
        return 0.5 * z.float().pow(2).mean(dim=(1, 2)) - log_det / self.num_dims

    @staticmethod
    def nll_nats_per_dim(loss: torch.Tensor) -> torch.Tensor:
        """Exact NLL in nats/dim from :meth:`nll_loss`: L_NF + 1/2 log(2 pi) (method §4.4)."""
        return loss + 0.5 * LOG_2PI

    @staticmethod
    def bits_per_dim(loss: torch.Tensor) -> torch.Tensor:
        """NLL in bits/dim from :meth:`nll_loss`: (L_NF + 1/2 log 2 pi) / ln 2 (method §4.4)."""
        return (loss + 0.5 * LOG_2PI) / math.log(2)

    # ------------------------------------------------------------------------------------------------------
    def _guided(
        self, a: torch.Tensor, b: torch.Tensor, guide: Optional[Guidance], w: float
    ) -> Tuple[torch.Tensor, torch.Tensor]:
        """Combine raw head outputs into (log_sigma, mu) in fp32 (method §7).

        Args:
            a, b: raw head outputs, (B, ...) when ``guide`` is None, else (2B, ...) = [conditional; unconditional].
            guide: the guidance of a ``"guided"`` block (:meth:`Guidance.block_role`), or None.
            w: the guidance weight of this token (:meth:`Guidance.weight`).
        Returns:
            log_sigma, mu: (B, ...) each. Linear modes: ``ls_c + w (ls_c - ls_u)`` and ``mu_c + w (mu_c - mu_u)`` on
            the soft-clipped, parametrised values; ``gaussian``: the STARFlow product-of-Gaussians formulas.
        """
        if guide is None:
            return self._affine_params(a, b)
        n = a.shape[0] // 2
        ls, mu = self._affine_params(a, b)
        ls_c, ls_u, mu_c, mu_u = ls[:n], ls[n:], mu[:n], mu[n:]
        if guide.mode != "gaussian":
            return ls_c + w * (ls_c - ls_u), mu_c + w * (mu_c - mu_u)
        s = torch.exp(2 * (ls_c - ls_u)).clamp(max=1.0)  # min(sigma_c / sigma_u, 1)^2
        denom = 1 + w - w * s
        mu_g = ((1 + w) * mu_c - w * s * mu_u) / denom
        return ls_c - 0.5 * torch.log(denom), mu_g

    @torch.no_grad()
    def inverse(
        self,
        noise: torch.Tensor,
        y: torch.Tensor,
        guidance: Optional[Guidance] = None,
        use_cache: bool = True,
    ) -> torch.Tensor:
        """Noise -> latent, token by token (method §4.5).

        Args:
            noise: (B, T, C) float tokens (temperature is applied by the caller: noise = tau * eps).
            y: (B,) int64 labels (null = ``num_classes`` gives unconditional samples).
            guidance: CFG settings or None (scale 0 is the exact inverse of :meth:`forward`).
            use_cache: KV-cached decoding (one token per step through the layers) or naive prefix recomputation.
        Returns:
            latent (B, C_lat, H, W) float32.
        """
        x = noise.float()
        bsz = x.shape[0]
        self.check_labels(y)  # sampling entry point: labels come from the caller
        c_cond = self.condition(y)
        c_null = self.condition(torch.full_like(y, self.num_classes))
        c_both = torch.cat([c_cond, c_null])
        n_blocks = len(self.blocks)
        for k in reversed(range(n_blocks)):
            block = self.blocks[k]
            role = guidance.block_role(k, n_blocks) if guidance is not None else "cond"
            guide = guidance if role == "guided" else None
            c = {"guided": c_both, "cond": c_cond, "uncond": c_null}[role]
            zp = self._permute(x, k)
            xp = torch.zeros_like(zp)
            caches = [{"capacity": self.num_tokens} for _ in block.layers] if use_cache else None
            for t in range(self.num_tokens):
                sos = block.sos.expand(bsz, 1, -1).to(zp.dtype)
                if use_cache:  # feed only the newest token; earlier keys/values come from the cache
                    inp, start = (sos if t == 0 else xp[:, t - 1 : t]), t
                else:  # recompute the whole prefix [sos, x_0 .. x_{t-1}]
                    inp, start = torch.cat([sos, xp[:, :t]], dim=1), 0
                if guide is not None:
                    inp = torch.cat([inp, inp])
                a, b = block.head_output(inp, c, start=start, caches=caches)[0][:, -1:].chunk(2, dim=-1)
                w = guide.weight(t, self.num_tokens) if guide is not None else 0.0
                log_sigma, mu = self._guided(a, b, guide, w)
                xp[:, t : t + 1] = zp[:, t : t + 1] * torch.exp(log_sigma) + mu
            x = self._permute(xp, k)
        return unpatchify(x, self.patch_size, self.in_channels, self.latent_size)
