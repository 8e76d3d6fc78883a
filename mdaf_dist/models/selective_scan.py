"""The selective scan of Mamba (Gu & Dao 2023, Algorithm 2) behind one function, several backends.

``selective_scan`` has the semantics and tensor layouts of ``mamba_ssm``'s ``selective_scan_fn``
(real A, input-dependent B and C of shape [batch, N, L]). For every channel d and state n:

    delta_t = softplus(delta_t + delta_bias)            (bias and softplus optional)
    h_t     = exp(delta_t A) h_{t-1} + delta_t B_t u_t  (zero-order-hold discretisation)
    y_t     = C_t . h_t + D u_t,   out_t = y_t * silu(z_t)

A step with delta_t = 0 leaves the state untouched, which is how padded steps are skipped.

Backends:
- ``reference``: the loop above under autograd; the ground truth, and slow (its autograd graph
  holds every per-step [batch, d_inner, N] state).
- ``cpu``: a hand-written forward and reverse-time backward over batch blocks (``_ChunkedScan``).
- ``compiled``: the same blocked algorithm with its kernels run through ``torch.compile``
  (Triton on CUDA, C++ on CPU), for GPUs without ``mamba_ssm``.
- ``mamba_ssm``: the fused CUDA kernel of the ``mamba_ssm`` package.
- ``auto``: ``mamba_ssm`` on CUDA if installed, else ``compiled`` on CUDA, else ``cpu``.
"""

from __future__ import annotations

import functools
import importlib.util
from typing import Callable, NamedTuple, Optional

import torch
import torch.nn.functional as F
from torch import Tensor

BACKENDS = ("auto", "reference", "cpu", "compiled", "mamba_ssm")


def selective_scan(
    u: Tensor,
    delta: Tensor,
    A: Tensor,
    B: Tensor,
    C: Tensor,
    D: Optional[Tensor] = None,
    z: Optional[Tensor] = None,
    delta_bias: Optional[Tensor] = None,
    delta_softplus: bool = False,
    backend: str = "auto",
) -> Tensor:
    """y [batch, d_inner, L] from u, delta [batch, d_inner, L], A [d_inner, N], B, C [batch, N, L].

    D [d_inner] is the skip connection, z [batch, d_inner, L] the gate, delta_bias [d_inner] is
    added to delta before the optional softplus. The result has u's dtype; the scan runs in fp32.
    """
    name = resolve_backend(backend, u.device)
    if name == "reference":
        return selective_scan_reference(u, delta, A, B, C, D, z, delta_bias, delta_softplus)
    if name == "mamba_ssm":
        if u.device.type != "cuda" or not mamba_ssm_available():
            raise ValueError(f"selective-scan backend 'mamba_ssm' needs the mamba_ssm package and CUDA tensors "
                             f"(installed: {mamba_ssm_available()}, device: {u.device})")
        from mamba_ssm.ops.selective_scan_interface import selective_scan_fn

        return selective_scan_fn(u, delta, A, B, C, D, z, delta_bias, delta_softplus)
    kernels = _EAGER_KERNELS if name == "cpu" else _compiled_kernels()
    return _ChunkedScan.apply(u, delta, A, B, C, D, z, delta_bias, delta_softplus, kernels)


def resolve_backend(backend: str, device: torch.device) -> str:
    """The concrete backend ``backend`` names on ``device`` ("auto" resolved); ValueError if unknown."""
    if backend not in BACKENDS:
        raise ValueError(f"unknown selective-scan backend {backend!r}; choose one of {', '.join(BACKENDS)}")
    if backend != "auto":
        return backend
    if device.type == "cuda":
        return "mamba_ssm" if mamba_ssm_available() else "compiled"
    return "cpu"


def mamba_ssm_available() -> bool:
    """Whether ``mamba_ssm`` (an optional CUDA extra) is installed."""
    return importlib.util.find_spec("mamba_ssm") is not None


def selective_scan_reference(u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False):
    """The naive per-step loop under autograd (mamba_ssm's ``selective_scan_ref``, real A only)."""
    dtype_in = u.dtype
    u, delta = u.float(), delta.float()
    if delta_bias is not None:
        delta = delta + delta_bias[:, None].float()
    if delta_softplus:
        delta = F.softplus(delta)
    deltaA = torch.exp(torch.einsum("bdl,dn->bdln", delta, A.float()))
    deltaB_u = torch.einsum("bdl,bnl,bdl->bdln", delta, B.float(), u)
    h = u.new_zeros(u.shape[0], u.shape[1], A.shape[1])
    ys = []
    for t in range(u.shape[2]):
        h = deltaA[:, :, t] * h + deltaB_u[:, :, t]
        ys.append(torch.einsum("bdn,bn->bd", h, C[:, :, t].float()))
    y = torch.stack(ys, dim=2)
    if D is not None:
        y = y + u * D[:, None].float()
    if z is not None:
        y = y * F.silu(z.float())
    return y.to(dtype_in)


# --------------------------------------------------------------------------------------------
# The blocked scan: batch blocks, time-major [L, block, ...] tensors, recomputation in backward.
#
# The batch is cut into blocks so that the per-block [L, block, d_inner, N] buffers stay small
# (a few tens of MB) however large the batch is; the forward keeps no state at all and the
# backward recomputes each block's states before its reverse-time scan. Nothing ever holds the
# [batch, L, d_inner, N] tensors the reference materialises several times over.
# --------------------------------------------------------------------------------------------

_BLOCK_BYTES = {"cpu": 32 << 20, "cuda": 1 << 30}  # per [L, block, d_inner, N] fp32 buffer


def _block_states(delta, u, A, B, C, dA, h):
    """Fill dA[t] = exp(delta_t A) and h[t] (the state after step t); return y_t = C_t . h_t.

    delta, u: [L, b, d]; B, C: [L, b, N]; dA, h: [L, b, d, N] buffers, overwritten.
    """
    L, b, d, n = h.shape
    torch.mul(delta.unsqueeze(-1), A, out=dA).exp_()
    torch.mul((delta * u).unsqueeze(-1), B.unsqueeze(2), out=h)  # delta_t B_t u_t
    for t in range(1, L):
        h[t].addcmul_(dA[t], h[t - 1])
    return torch.bmm(h.view(L * b, d, n), C.reshape(L * b, n, 1)).view(L, b, d)


def _block_grads(delta, u, A, B, C, dA, h, grad_y, grad_h):
    """Reverse-time scan of one block: grads of delta, u (scan part), A, B, C.

    grad_y: [L, b, d] is the gradient of C_t . h_t. dA and h come from ``_block_states``; dA and
    grad_h (a buffer like h) are overwritten.
    """
    L, b, d, n = h.shape
    # grad_h[t] = C_t grad_y_t + exp(delta_{t+1} A) grad_h[t+1]
    torch.mul(grad_y.unsqueeze(-1), C.unsqueeze(2), out=grad_h)
    for t in range(L - 2, -1, -1):
        grad_h[t].addcmul_(dA[t + 1], grad_h[t + 1])
    flat_h, flat_gh = h.view(L * b, d, n), grad_h.view(L * b, d, n)
    grad_C = torch.bmm(grad_y.reshape(L * b, 1, d), flat_h).view(L, b, n)
    grad_B = torch.bmm((delta * u).view(L * b, 1, d), flat_gh).view(L, b, n)
    grad_Bu = torch.bmm(flat_gh, B.reshape(L * b, n, 1)).view(L, b, d)  # sum_n grad_h B_t
    # Through exp(delta_t A) h_{t-1}: w = grad_h[t] * dA[t] * h[t-1], computed in place in dA.
    w = dA.mul_(grad_h)
    w[1:].mul_(h[:-1])
    w[0].zero_()  # h_{-1} = 0
    grad_A = torch.einsum("xd,xdn->dn", delta.reshape(L * b, d), w.view(L * b, d, n))
    grad_delta = w.mul_(A).sum(-1).addcmul_(u, grad_Bu)
    return grad_delta, delta * grad_Bu, grad_A, grad_B, grad_C


class _Kernels(NamedTuple):
    states: Callable
    grads: Callable


_EAGER_KERNELS = _Kernels(_block_states, _block_grads)


@functools.cache
def _compiled_kernels() -> _Kernels:
    """The two block kernels through ``torch.compile``, wrapped once per process."""
    return _Kernels(torch.compile(_block_states), torch.compile(_block_grads))


def _block_size(L: int, d: int, n: int, device: torch.device) -> int:
    budget = _BLOCK_BYTES["cuda" if device.type == "cuda" else "cpu"]
    return max(1, budget // (4 * L * d * n))


def _time_major(x: Tensor) -> Tensor:
    """[b, c, L] -> contiguous fp32 [L, b, c]."""
    return x.permute(2, 0, 1).float().contiguous()


class _ChunkedScan(torch.autograd.Function):
    """Selective scan with a hand-written backward: per batch block, recompute the states, then
    run the gradient of the state backwards in time. No autograd graph over per-step states."""

    @staticmethod
    def forward(ctx, u, delta, A, B, C, D, z, delta_bias, delta_softplus, kernels):
        batch, d, L = u.shape
        n = A.shape[1]
        A32 = A.float()
        delta_raw = delta.float()
        if delta_bias is not None:
            delta_raw = delta_raw + delta_bias.float()[:, None]
        dt = F.softplus(delta_raw) if delta_softplus else delta_raw
        y = torch.empty(batch, d, L, device=u.device, dtype=torch.float32)
        block = _block_size(L, d, n, u.device)
        dA = h = None
        for b0 in range(0, batch, block):
            b1 = min(batch, b0 + block)
            if dA is None or dA.shape[1] != b1 - b0:
                dA = u.new_empty(L, b1 - b0, d, n, dtype=torch.float32)
                h = torch.empty_like(dA)
            yb = kernels.states(_time_major(dt[b0:b1]), _time_major(u[b0:b1]), A32,
                                _time_major(B[b0:b1]), _time_major(C[b0:b1]), dA, h)
            y[b0:b1] = yb.permute(1, 2, 0)
        if D is not None:
            y.addcmul_(u.float(), D.float()[:, None])
        out = y if z is None else y * F.silu(z.float())
        ctx.save_for_backward(u, delta_raw, A, B, C, D, z, delta_bias, None if z is None else y)
        ctx.delta_softplus = delta_softplus
        ctx.delta_dtype = delta.dtype
        ctx.kernels = kernels
        return out.to(u.dtype)

    @staticmethod
    def backward(ctx, grad_out):
        u, delta_raw, A, B, C, D, z, delta_bias, y = ctx.saved_tensors
        batch, d, L = u.shape
        n = A.shape[1]
        A32, u32, grad_out = A.float(), u.float(), grad_out.float()
        dt = F.softplus(delta_raw) if ctx.delta_softplus else delta_raw
        grad_z = None
        if z is None:
            grad_y = grad_out
        else:
            sig_z = torch.sigmoid(z.float())
            grad_y = grad_out * z.float() * sig_z  # silu(z)
            grad_z = (grad_out * y * sig_z * (1 + z.float() * (1 - sig_z))).to(z.dtype)
        grad_u = torch.empty_like(u32)
        grad_delta = torch.empty_like(u32)
        grad_B = torch.empty(batch, n, L, device=u.device, dtype=torch.float32)
        grad_C = torch.empty_like(grad_B)
        grad_A = torch.zeros_like(A32)
        block = _block_size(L, d, n, u.device)
        dA = h = grad_h = None
        for b0 in range(0, batch, block):
            b1 = min(batch, b0 + block)
            if dA is None or dA.shape[1] != b1 - b0:
                dA = u32.new_empty(L, b1 - b0, d, n)
                h, grad_h = torch.empty_like(dA), torch.empty_like(dA)
            dt_b, u_b = _time_major(dt[b0:b1]), _time_major(u32[b0:b1])
            B_b, C_b = _time_major(B[b0:b1]), _time_major(C[b0:b1])
            ctx.kernels.states(dt_b, u_b, A32, B_b, C_b, dA, h)
            g_dt, g_u, g_A, g_B, g_C = ctx.kernels.grads(
                dt_b, u_b, A32, B_b, C_b, dA, h, _time_major(grad_y[b0:b1]), grad_h)
            grad_delta[b0:b1] = g_dt.permute(1, 2, 0)
            grad_u[b0:b1] = g_u.permute(1, 2, 0)
            grad_B[b0:b1] = g_B.permute(1, 2, 0)
            grad_C[b0:b1] = g_C.permute(1, 2, 0)
            grad_A += g_A
        grad_D = None
        if D is not None:
            grad_u.addcmul_(grad_y, D.float()[:, None])
            grad_D = (grad_y * u32).sum(dim=(0, 2)).to(D.dtype)
        if ctx.delta_softplus:
            grad_delta.mul_(torch.sigmoid(delta_raw))
        grad_bias = None if delta_bias is None else grad_delta.sum(dim=(0, 2)).to(delta_bias.dtype)
        return (grad_u.to(u.dtype), grad_delta.to(ctx.delta_dtype), grad_A.to(A.dtype),
                grad_B.to(B.dtype), grad_C.to(C.dtype), grad_D, grad_z, grad_bias, None, None)
