"""Building blocks shared by the flow transformer: the linear-layer factory and adaLN modulation.

The **linear-layer factory** is the seam through which tensor parallelism enters the model from outside
(TorchTitan style): the flow transformer creates *every* linear layer by calling a factory with a ``parallel``
hint, and never imports ``torch.distributed``.

* ``parallel="column"``: output features may be split across tensor-parallel ranks (q, k, v, MLP up). The
  layer's output then holds only this rank's slice, so callers derive per-rank head counts from the output width.
* ``parallel="row"``: input features may be split across TP ranks; the output is complete (attention out,
  MLP down).
* ``parallel="none"``: always replicated (embeddings in, adaLN, output head).

:class:`DenseLinearFactory` (the default) returns ordinary dense layers for all three hints. The engine's
tensor-parallel factory (``simflow.parallel``) returns megatron-core ``ColumnParallelLinear`` /
``RowParallelLinear`` wrappers for ``column``/``row``.

Weights are initialised by ``init_fn`` applied to the **full** (unsharded) fp32 weight, in construction order,
so that a TP factory that initialises a full master weight and keeps its slice (megatron-core
``use_cpu_initialization=True``) yields the same full weights whatever the TP size. Biases start at zero.
"""

from __future__ import annotations

from typing import Callable, Optional

import torch
from torch import nn

InitFn = Callable[[torch.Tensor], None]


def normal_init(std: float = 0.02) -> InitFn:
    """``N(0, std^2)`` initialiser (TarFlow/STARFlow use small-normal inits, method §4.3)."""

    def init(w: torch.Tensor) -> None:
        nn.init.normal_(w, mean=0.0, std=std)

    return init


def zeros_init(w: torch.Tensor) -> None:
    """Zero initialiser (adaLN-Zero modulation and the flow's output head, method §4.3 steps 3 and 5)."""
    nn.init.zeros_(w)


def xavier_init(w: torch.Tensor) -> None:
    """Xavier-uniform initialiser for square-ish projections."""
    nn.init.xavier_uniform_(w)


class DenseLinear(nn.Linear):
    """``nn.Linear`` whose weight is initialised by ``init_fn`` only (bias zero), consuming the RNG exactly once.

    Shapes: input ``(..., in_features)`` -> output ``(..., out_features)``, any float dtype.
    """

    def __init__(self, in_features: int, out_features: int, bias: bool = True, init_fn: Optional[InitFn] = None):
        self._init_fn = init_fn or xavier_init
        super().__init__(in_features, out_features, bias=bias)

    def reset_parameters(self) -> None:  # called by nn.Linear.__init__
        with torch.no_grad():
            self._init_fn(self.weight)
            if self.bias is not None:
                self.bias.zero_()


class DenseLinearFactory:
    """Default factory: a :class:`DenseLinear` for every ``parallel`` hint (single device / data parallel)."""

    tp_size: int = 1

    def __call__(
        self,
        in_features: int,
        out_features: int,
        *,
        bias: bool = True,
        parallel: str = "none",
        init_fn: Optional[InitFn] = None,
    ) -> nn.Module:
        if parallel not in ("column", "row", "none"):
            raise ValueError(f"parallel must be 'column', 'row' or 'none', got {parallel!r}")
        return DenseLinear(in_features, out_features, bias=bias, init_fn=init_fn)


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, is_causal: bool = False,
              attn_mask: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Scaled dot-product attention ``softmax(q k^T / sqrt(hd) + mask) v`` (arXiv 1706.03762 eq. 1; method §4.3 step 4)
    through ``F.scaled_dot_product_attention``.

    Shapes: q (B, H, Tq, hd), k and v (B, H, Tk, hd) -> (B, H, Tq, hd) in q's dtype. ``attn_mask``: bool
    (Tq, Tk), True = attend. On CPU a bf16/fp16 attention runs in fp32 (outside autocast) and is cast back: PyTorch's
    CPU flash-attention kernel is several times slower in bf16 than in fp32 at our shapes, backward especially
    (``tools/bench_flow.py --precision bf16``, README "Speed"), and fp32 is the more accurate of the two. On CUDA the
    inputs' dtype is kept (bf16 flash attention).
    """
    if q.device.type == "cpu" and q.dtype in (torch.bfloat16, torch.float16):
        with torch.autocast("cpu", enabled=False):
            out = nn.functional.scaled_dot_product_attention(q.float(), k.float(), v.float(), attn_mask=attn_mask,
                                                             is_causal=is_causal)
        return out.to(q.dtype)
    return nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, is_causal=is_causal)


class _Modulate(torch.autograd.Function):
    """``x * (1 + scale) + shift`` with a hand-written backward (see :func:`modulate`). The backward is built from
    differentiable ops on the saved inputs, so double backward (``create_graph=True``) is exact too."""

    generate_vmap_rule = True

    @staticmethod
    def forward(x, shift, scale):
        return torch.addcmul(shift.unsqueeze(1), x, 1 + scale.unsqueeze(1))

    @staticmethod
    def setup_context(ctx, inputs, output):
        x, shift, scale = inputs
        ctx.save_for_backward(x, scale)
        ctx.shift_dtype = shift.dtype

    @staticmethod
    def backward(ctx, grad):
        x, scale = ctx.saved_tensors
        need_x, need_shift, need_scale = ctx.needs_input_grad
        grad_x = (grad * (1 + scale.unsqueeze(1))).to(x.dtype) if need_x else None
        grad_shift = grad.sum(1).to(ctx.shift_dtype) if need_shift else None
        grad_scale = (grad * x).sum(1).to(scale.dtype) if need_scale else None
        return grad_x, grad_shift, grad_scale


class _GatedResidual(torch.autograd.Function):
    """``x + gate * y`` with a hand-written backward (see :func:`gated_residual`); double backward exact as in
    :class:`_Modulate`."""

    generate_vmap_rule = True

    @staticmethod
    def forward(x, gate, y):
        return torch.addcmul(x, gate.unsqueeze(1), y)

    @staticmethod
    def setup_context(ctx, inputs, output):
        x, gate, y = inputs
        ctx.save_for_backward(gate, y)
        ctx.x_dtype = x.dtype

    @staticmethod
    def backward(ctx, grad):
        gate, y = ctx.saved_tensors
        need_x, need_gate, need_y = ctx.needs_input_grad
        grad_gate = (grad * y).sum(1).to(gate.dtype) if need_gate else None
        grad_y = (grad * gate.unsqueeze(1)).to(y.dtype) if need_y else None
        return (grad.to(ctx.x_dtype) if need_x else None), grad_gate, grad_y


def modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """adaLN modulation ``x * (1 + scale) + shift`` (DiT, arXiv 2212.09748 §3.2; method §4.3 step 3).

    Shapes: ``x`` (B, T, D); ``shift``/``scale`` (B, D), broadcast over tokens -> (B, T, D) in the promoted dtype
    (fp32 when ``x`` is fp32 and the modulation bf16, as under autocast). Forward is one ``addcmul`` kernel. The
    backward is written out because autograd's ``addcmul`` backward scales both factors by its ``value`` argument
    (an extra full pass over a (B, T, D) tensor per call): ``dx = g (1 + scale)``, ``dshift = sum_t g``,
    ``dscale = sum_t g x``, i.e. two full-size products and two token reductions; gradients come back in each
    input's dtype, bit-equal to autograd of the ``addcmul`` form.
    """
    return _Modulate.apply(x, shift, scale)


def gated_residual(x: torch.Tensor, gate: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """adaLN-Zero gated residual ``x + gate * y`` (DiT, arXiv 2212.09748 §3.2; method §4.3 step 3).

    Shapes: ``x``, ``y`` (B, T, D); ``gate`` (B, D), broadcast over tokens -> (B, T, D) in the promoted dtype.
    One ``addcmul`` forward; backward ``dx = g``, ``dy = g gate``, ``dgate = sum_t g y`` (no extra pass, as in
    :func:`modulate`). Gradients come back in each input's dtype, bit-equal to autograd of the ``addcmul`` form.
    """
    return _GatedResidual.apply(x, gate, y)


class FP32LayerNorm(nn.LayerNorm):
    """LayerNorm computed in fp32 and cast back (TarFlow computes norms in fp32, method §4.3 step 4)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self.weight.float() if self.weight is not None else None
        b = self.bias.float() if self.bias is not None else None
        return nn.functional.layer_norm(x.float(), self.normalized_shape, w, b, self.eps).type_as(x)



