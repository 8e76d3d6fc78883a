"""One Mamba block (MDAF_paper.md 4.4, Algorithm 1), laid out like ``mamba_ssm.Mamba``.

Parameter names, shapes and initialisation follow ``mamba_ssm.Mamba`` (in_proj, conv1d, x_proj,
dt_proj, A_log, D, out_proj), so a ``state_dict`` moves between this module and ``mamba_ssm``'s.
The forward reads top to bottom next to Algorithm 1 (mamba-minimal style); the selective scan
itself is ``selective_scan`` with a choice of backends.

Padding: sequences are right-aligned (left-padded). On padded steps H_x is zeroed before the
convolution and delta is set to 0, so the state stays exactly zero until the first real step and
the outputs on real steps do not depend on how much padding precedes them. Outputs on padded
steps carry no meaning.
"""

from __future__ import annotations

import math
from typing import Optional, Tuple, Union

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from mdaf_dist.models import cpu_kernels
from mdaf_dist.models.selective_scan import check_backend, resolve_backend, selective_scan


class Mamba(nn.Module):
    """x [B, L, d_model] (+ mask [B, L], True on real steps) -> [B, L, d_model] (or [B, d_model])."""

    def __init__(
        self,
        d_model: int,
        d_state: int = 16,
        d_conv: int = 4,
        expand: int = 2,
        dt_rank: Union[int, str] = "auto",
        scan_backend: str = "auto",
        dt_min: float = 0.001,
        dt_max: float = 0.1,
        dt_init_floor: float = 1e-4,
    ):
        super().__init__()
        check_backend(scan_backend)  # fail early on an unknown name
        self.d_model, self.d_state, self.d_conv = d_model, d_state, d_conv
        self.d_inner = expand * d_model
        self.dt_rank = math.ceil(d_model / 16) if dt_rank == "auto" else int(dt_rank)
        self.scan_backend = scan_backend

        self.in_proj = nn.Linear(d_model, 2 * self.d_inner, bias=False)
        self.conv1d = nn.Conv1d(self.d_inner, self.d_inner, kernel_size=d_conv,
                                groups=self.d_inner, padding=d_conv - 1, bias=True)
        self.x_proj = nn.Linear(self.d_inner, self.dt_rank + 2 * d_state, bias=False)
        self.dt_proj = nn.Linear(self.dt_rank, self.d_inner, bias=True)
        self.A_log = nn.Parameter(torch.empty(self.d_inner, d_state))
        self.D = nn.Parameter(torch.empty(self.d_inner))
        self.out_proj = nn.Linear(self.d_inner, d_model, bias=False)
        # mamba_ssm keeps weight decay off A_log and D; the optimizer reads this mark
        self.A_log._no_weight_decay = True
        self.D._no_weight_decay = True
        self._init_ssm(dt_min, dt_max, dt_init_floor)

    @torch.no_grad()
    def _init_ssm(self, dt_min: float, dt_max: float, dt_init_floor: float) -> None:
        """mamba_ssm's initialisation: dt log-uniform in [dt_min, dt_max] through the inverse
        softplus in the bias, S4D-real A = -(1..N), D = 1."""
        dt_init_std = self.dt_rank ** -0.5
        nn.init.uniform_(self.dt_proj.weight, -dt_init_std, dt_init_std)
        dt = torch.exp(torch.rand(self.d_inner) * (math.log(dt_max) - math.log(dt_min)) + math.log(dt_min))
        dt = dt.clamp(min=dt_init_floor)
        self.dt_proj.bias.copy_(dt + torch.log(-torch.expm1(-dt)))  # softplus^-1(dt)
        self.A_log.copy_(torch.log(torch.arange(1, self.d_state + 1, dtype=torch.float32)).expand(self.d_inner, -1))
        self.D.fill_(1.0)

    def forward(self, x: Tensor, mask: Optional[Tensor] = None, last_only: bool = False) -> Tensor:
        """last_only: return only the last step's output [B, d_model], what a reader of right-aligned
        sequences takes; out_proj then runs on that step alone."""
        # 1. H_x, H_z <- Linear(H_seq)
        h_x, h_z = _InProjection.apply(x, self.in_proj.weight)
        # 2. H'_x <- SiLU(Conv1d(H_x)), causal, with H_x zero on padded steps: the steps a real
        #    step's window reaches before it carry no input. Two handles on H'_x: x_proj's and the scan's.
        h_x, u = self._conv_silu(h_x, mask)  # [B, L, d_inner]
        # 3.-5. A <- -exp(A_log); B, C, dt <- Linear(H'_x); delta <- softplus(dt_proj(dt))
        dt, B, C = self.x_proj(h_x).split([self.dt_rank, self.d_state, self.d_state], dim=-1)
        A = -torch.exp(self.A_log.float())
        # 6.-7. H_y <- SelectiveSSM(discretize(delta, A, B), C)(H'_x), gated by SiLU(H_z); the
        #    [B, L, d] tensors go in as [B, d, L] views. delta = softplus(dt_proj(dt)) is formed
        #    inside the scan: dt_proj's weight and bias, the softplus and the mask (delta = 0 on
        #    padded steps: exp(0 A) = 1 and no input, the state is carried over).
        u, dt, B, C, z = (t.transpose(1, 2) for t in (u, dt, B, C, h_z))
        y = selective_scan(u, dt, A, B, C, self.D.float(), z=z, delta_bias=self.dt_proj.bias.float(), delta_softplus=True,
                           backend=self.scan_backend, mask=mask, last_only=last_only, delta_proj=self.dt_proj.weight)
        # 8. H_o <- Linear(H_y * SiLU(H_z))
        return self.out_proj(y if last_only else y.transpose(1, 2))

    def _conv_silu(self, h_x: Tensor, mask: Optional[Tensor]) -> Tuple[Tensor, Tensor]:
        """SiLU(causal depthwise conv1d) of [B, L, d_inner] with the masked steps zero, in that
        layout, as two handles for its two readers. With the fused CPU scan the conv is fused too
        (no layout change, the mask read in place), and the two handles bring their gradients back
        apart, for the kernel to add as it reads them; otherwise torch's conv1d with K - 1 zero steps
        on the left only, so that it returns exactly L steps (conv1d's own two-sided padding is kept
        for mamba_ssm's parameter layout only)."""
        if h_x.dtype == torch.float32 and resolve_backend(self.scan_backend, h_x.device) == "fused_cpu":
            mask_values = None if mask is None else mask.float().contiguous()
            return _FusedCausalConvSiLU.apply(h_x, self.conv1d.weight, self.conv1d.bias, mask_values)
        if mask is not None:
            h_x = h_x * mask.unsqueeze(-1).to(h_x.dtype)
        x = F.pad(h_x.transpose(1, 2), (self.d_conv - 1, 0))
        out = F.silu(F.conv1d(x, self.conv1d.weight, self.conv1d.bias, groups=self.d_inner)).transpose(1, 2)
        return out, out


class _InProjection(torch.autograd.Function):
    """in_proj's two halves, H_x = x W_x^T and H_z = x W_z^T, as two products: each result and its
    gradient is one contiguous [B, L, d_inner] tensor (no split of one output, no cat of the
    gradients). x's gradient is one product added into the other by the GEMM itself (addmm), where
    two F.linear would leave autograd a pass of its own to add them."""

    @staticmethod
    def forward(ctx, x, weight):
        ctx.save_for_backward(x, weight)
        w_x, w_z = weight.chunk(2)
        return F.linear(x, w_x), F.linear(x, w_z)

    @staticmethod
    def backward(ctx, grad_h_x, grad_h_z):
        x, weight = ctx.saved_tensors
        w_x, w_z = weight.chunk(2)
        rows = x.reshape(-1, x.shape[-1])
        grad_h_x, grad_h_z = (g.reshape(-1, g.shape[-1]) for g in (grad_h_x, grad_h_z))
        grad_x = grad_h_x.mm(w_x).addmm_(grad_h_z, w_z).view_as(x) if ctx.needs_input_grad[0] else None
        grad_weight = torch.cat([grad_h_x.t().mm(rows), grad_h_z.t().mm(rows)]) if ctx.needs_input_grad[1] else None
        return grad_x, grad_weight


class _FusedCausalConvSiLU(torch.autograd.Function):
    """The causal conv + SiLU kernel of ``csrc/mamba_cpu.cpp`` (a mask [B, L] zeroes the input's
    padded steps); saves its input, not its output. The output is returned twice, the second a
    view: each reader's gradient comes back on its own and the kernel adds the two as it reads."""

    @staticmethod
    def forward(ctx, x, weight, bias, mask):
        x, weight_t = x.contiguous(), weight.squeeze(1).t().contiguous()  # weight [d, 1, K] -> [K, d]
        ctx.save_for_backward(x, weight_t, bias, mask)
        out = cpu_kernels.load().causal_conv_silu_fwd(x, weight_t, bias, mask)
        return out, out.view_as(out)

    @staticmethod
    def backward(ctx, grad, grad_other):
        x, weight_t, bias, mask = ctx.saved_tensors
        grad_x, grad_weight_t, grad_bias = cpu_kernels.load().causal_conv_silu_bwd(
            x, weight_t, bias, mask, grad.contiguous(), grad_other.contiguous())
        return grad_x, grad_weight_t.t().unsqueeze(1), grad_bias, None
