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
- ``fused_cpu``: one C++ pass over time per (batch, block of 16 channels, chunk of states),
  the channels a vector's lanes, the chunk's states in registers, work over torch's threads
  (``csrc/mamba_cpu.cpp``, built on first use by ``cpu_kernels``); several times faster than
  ``cpu``, and saves nothing but its inputs.
- ``cpu``: a hand-written forward and reverse-time backward over batch blocks (``_ChunkedScan``),
  in eager PyTorch ops; the fallback where the fused kernel cannot be built.
- ``compiled``: the same blocked algorithm with its kernels run through ``torch.compile``
  (Triton on CUDA, C++ on CPU), for GPUs without ``mamba_ssm``.
- ``mamba_ssm``: the fused CUDA kernel of the ``mamba_ssm`` package.
- ``auto``: ``mamba_ssm`` on CUDA if installed, else ``compiled`` on CUDA; on CPU ``fused_cpu``, or
  ``cpu`` (with one printed line saying why) where the kernel does not build.
"""

from __future__ import annotations

import functools
import importlib.util
from typing import Callable, NamedTuple, Optional, get_args

import torch
import torch.nn.functional as F
from torch import Tensor

from mdaf_dist.config import ScanBackend
from mdaf_dist.models import cpu_kernels

BACKENDS = get_args(ScanBackend)


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
    mask: Optional[Tensor] = None,
    last_only: bool = False,
    delta_proj: Optional[Tensor] = None,
) -> Tensor:
    """y [batch, d_inner, L] from u, delta [batch, d_inner, L], A [d_inner, N], B, C [batch, N, L].

    D [d_inner] is the skip connection, z [batch, d_inner, L] the gate, delta_bias [d_inner] is
    added to delta before the optional softplus. The result has u's dtype; the scan runs in fp32.
    Beyond ``mamba_ssm``'s arguments: mask [batch, L] (True on real steps) sets the step size of
    the other steps to 0 after the softplus, so that they carry the state over; last_only returns
    the last step's output alone, [batch, d_inner]; delta_proj [d_inner, R] takes delta as its
    low-rank factor [batch, R, L], the full delta being delta_proj @ delta (Mamba's dt_proj). The
    fused CPU kernel does all three inside the scan; the other backends apply them around it.
    """
    name = resolve_backend(backend, u.device)
    if name == "fused_cpu":
        mask_values = None if mask is None else mask.float()
        return _FusedScan.apply(u, delta, A, B, C, D, z, delta_bias, delta_proj, delta_softplus, mask_values, last_only)
    if delta_proj is not None:
        delta = torch.matmul(delta_proj, delta)
    if mask is not None:
        delta = _delta_steps(delta, delta_bias, delta_softplus)[1] * mask.unsqueeze(1)
        delta_bias, delta_softplus = None, False
    y = _scan(name, u, delta, A, B, C, D, z, delta_bias, delta_softplus)
    return y[..., -1] if last_only else y


def _scan(name, u, delta, A, B, C, D, z, delta_bias, delta_softplus) -> Tensor:
    """``selective_scan`` with mamba_ssm's arguments on the backends other than fused_cpu."""
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


def check_backend(backend: str) -> None:
    """ValueError naming the choices if ``backend`` is not one."""
    if backend not in BACKENDS:
        raise ValueError(f"unknown selective-scan backend {backend!r}; choose one of {', '.join(BACKENDS)}")


def resolve_backend(backend: str, device: torch.device) -> str:
    """The concrete backend ``backend`` names on ``device`` ("auto" resolved); ValueError if unknown.

    Resolving "auto" on CPU builds the fused kernel if this machine has not yet (once, cached).
    """
    check_backend(backend)
    if backend != "auto":
        return backend
    if device.type == "cuda":
        return "mamba_ssm" if mamba_ssm_available() else "compiled"
    return "fused_cpu" if cpu_kernels.available() else "cpu"


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


def _delta_steps(delta, delta_bias, delta_softplus):
    """(delta + delta_bias in fp32, the step sizes dt: its softplus when asked), as the fast
    backends take them; the backward of the softplus needs one or the other."""
    raw = delta.float()
    if delta_bias is not None:
        raw = raw + delta_bias.float()[:, None]
    return raw, F.softplus(raw) if delta_softplus else raw


class _FusedScan(torch.autograd.Function):
    """The fused C++ kernel's forward and backward (``csrc/mamba_cpu.cpp``), delta_bias, delta_proj,
    softplus, mask and last_only included; nothing is saved but the inputs. The kernel's full output is
    stored as [batch, L, d_inner] (a transposed view is returned), which is the layout out_proj
    reads."""

    @staticmethod
    def forward(ctx, u, delta, A, B, C, D, z, delta_bias, delta_proj, delta_softplus, mask, last_only):
        ctx.dtypes = [None if x is None else x.dtype for x in (u, delta, A, B, C, D, z, delta_bias, delta_proj)]
        A, D, delta_bias, delta_proj = (None if x is None else x.float().contiguous() for x in (A, D, delta_bias, delta_proj))
        inputs = (u.float(), delta.float(), A, B.float(), C.float(), D, None if z is None else z.float(), delta_bias, delta_proj)
        out = cpu_kernels.load().selective_scan_fwd(*inputs, delta_softplus, mask, last_only)
        ctx.save_for_backward(*inputs, mask)
        ctx.flags = delta_softplus, last_only
        return out.to(u.dtype)

    @staticmethod
    def backward(ctx, grad_out):
        *inputs, mask = ctx.saved_tensors
        delta_softplus, last_only = ctx.flags
        grads = cpu_kernels.load().selective_scan_bwd(*inputs, delta_softplus, mask, last_only, grad_out.float())
        # the kernel returns every gradient; those of absent inputs are dropped
        grads = [None if dtype is None else g.to(dtype) for g, dtype in zip(grads, ctx.dtypes)]
        return (*grads, None, None, None)


# --------------------------------------------------------------------------------------------
# The blocked scan: batch blocks cut into time chunks, time-major [T, block, ...] tensors.
#
# The per-element work (exp, the two scans, the products for the gradients) is memory-bound, so
# every [T, block, d_inner, N] buffer is kept small enough to stay in the CPU's cache: the batch
# is cut into blocks and time into chunks of T steps. The forward keeps only the state at each
# chunk boundary ([chunks - 1, batch, d_inner, N], a fraction 1/T of all states); the backward
# recomputes one chunk's states from its boundary, then runs the gradient of the state backwards
# over that chunk and hands it to the chunk before. Nothing ever holds all [batch, L, d_inner, N]
# states, as the reference does several times over.
# --------------------------------------------------------------------------------------------

# Per [T, block, d_inner, N] fp32 buffer; on CPU per intra-op thread, so that each thread's share
# of the three buffers stays in its core's L2 cache while the ops stay large enough to split.
_BLOCK_BYTES = {"cpu": 2 << 20, "cuda": 1 << 30}
_CHUNK_STEPS = {"cpu": 16, "cuda": None}  # T; None: the whole sequence in one chunk


def _chunk_states(delta, delta_u, A, B, C, dA, h):
    """Advance the state over one chunk of T steps; return y_t = C_t . h_t [T, b, d].

    delta, delta_u = delta * u: [T, b, d]; B, C: [T, b, N]. Buffers: dA [T, b, d, N] is filled with
    exp(delta_t A); h [T + 1, b, d, N] holds the state before the chunk in h[0] and gets the state
    after step t in h[t + 1].
    """
    T = dA.shape[0]
    torch.mul(delta.unsqueeze(-1), A, out=dA).exp_()
    torch.mul(delta_u.unsqueeze(-1), B.unsqueeze(2), out=h[1:])  # delta_t B_t u_t
    hs, dAs = h.unbind(0), dA.unbind(0)  # one call for all per-step views
    for t in range(T):
        hs[t + 1].addcmul_(dAs[t], hs[t])
    return _contract_state(h[1:], C)


def _contract_state(state: Tensor, v: Tensor) -> Tensor:
    """sum_n state[t, b, d, n] v[t, b, n] -> [T, b, d], as C_t . h_t.

    Written as [1, N] @ [N, d] products: bmm runs that transposed form several times faster on
    CPU than the [d, N] @ [N, 1] one.
    """
    T, b, d, n = state.shape
    return torch.bmm(v.reshape(T * b, 1, n), state.reshape(T * b, d, n).transpose(1, 2)).view(T, b, d)


def _chunk_grads(delta, delta_u, u, A, B, C, dA, h, grad_y, grad_h, carry):
    """Reverse-time scan over one chunk: grads of delta, u (scan part), A, B, C.

    grad_y [T, b, d] is the gradient of C_t . h_t; dA and h come from ``_chunk_states``. carry
    [b, d, N] holds, on entry, the gradient reaching the chunk's last state from later steps and,
    on return, the gradient reaching h[0]. dA and grad_h (a [T, b, d, N] buffer) are overwritten.
    """
    T, b, d, n = dA.shape
    # grad_h[t] = C_t grad_y_t + exp(delta_{t+1} A) grad_h[t+1]
    torch.mul(grad_y.unsqueeze(-1), C.unsqueeze(2), out=grad_h)
    grad_h[T - 1].add_(carry)
    ghs, dAs = grad_h.unbind(0), dA.unbind(0)
    for t in range(T - 2, -1, -1):
        ghs[t].addcmul_(dAs[t + 1], ghs[t + 1])
    torch.mul(dA[0], grad_h[0], out=carry)
    flat_gh = grad_h.view(T * b, d, n)
    grad_C = torch.bmm(grad_y.reshape(T * b, 1, d), h[1:].view(T * b, d, n)).view(T, b, n)
    grad_B = torch.bmm(delta_u.reshape(T * b, 1, d), flat_gh).view(T, b, n)
    grad_Bu = _contract_state(grad_h, B)  # sum_n grad_h B_t
    # Through exp(delta_t A) h_{t-1}: w = grad_h[t] * dA[t] * h[t-1], computed in place in dA.
    w = dA.mul_(grad_h).mul_(h[:-1])
    grad_A = torch.mul(w, delta.unsqueeze(-1), out=grad_h).sum((0, 1))  # grad_h is free now
    grad_delta = w.mul_(A).sum(-1).addcmul_(u, grad_Bu)
    return grad_delta, delta * grad_Bu, grad_A, grad_B, grad_C


class _Kernels(NamedTuple):
    states: Callable
    grads: Callable


_EAGER_KERNELS = _Kernels(_chunk_states, _chunk_grads)


@functools.cache
def _compiled_kernels() -> _Kernels:
    """The two chunk kernels through ``torch.compile``, wrapped once per process."""
    return _Kernels(torch.compile(_chunk_states), torch.compile(_chunk_grads))


class _Tiling(NamedTuple):
    block: int  # batch samples per block
    steps: int  # time steps per chunk

    @staticmethod
    def of(L: int, d: int, n: int, device: torch.device) -> "_Tiling":
        kind = "cuda" if device.type == "cuda" else "cpu"
        steps = min(L, _CHUNK_STEPS[kind] or L)
        budget = _BLOCK_BYTES[kind] * (torch.get_num_threads() if kind == "cpu" else 1)
        return _Tiling(max(1, budget // (4 * steps * d * n)), steps)


def _time_major(x: Tensor) -> Tensor:
    """[b, c, L] -> contiguous fp32 [L, b, c]."""
    return x.permute(2, 0, 1).float().contiguous()


class _Buffers:
    """The per-chunk [T, block, d_inner, N] work buffers, reallocated only for a ragged last block."""

    def __init__(self, like: Tensor, tiling: _Tiling, d: int, n: int):
        self.like, self.steps, self.d, self.n = like, tiling.steps, d, n
        self.block = -1

    def get(self, block: int, steps: int):
        """dA [steps, block, d, N], h [steps + 1, ...], grad_h [steps, ...], carry [block, d, N]."""
        if block != self.block:
            self.block = block
            shape = (self.steps + 1, block, self.d, self.n)
            self.dA, self.h, self.grad_h = (self.like.new_empty(shape, dtype=torch.float32) for _ in range(3))
            self.carry = self.like.new_empty(shape[1:], dtype=torch.float32)
        return self.dA[:steps], self.h[:steps + 1], self.grad_h[:steps], self.carry


class _ChunkedScan(torch.autograd.Function):
    """Selective scan with a hand-written backward: per batch block and time chunk, recompute the
    states from the saved chunk boundary, then run the gradient of the state backwards in time.
    No autograd graph over per-step states."""

    @staticmethod
    def forward(ctx, u, delta, A, B, C, D, z, delta_bias, delta_softplus, kernels):
        batch, d, L = u.shape
        n = A.shape[1]
        A32 = A.float()
        delta_raw, dt = _delta_steps(delta, delta_bias, delta_softplus)
        tiling = _Tiling.of(L, d, n, u.device)
        starts = range(0, L, tiling.steps)
        keep_boundaries = any(ctx.needs_input_grad[:8])
        boundaries = u.new_empty(len(starts) - 1 if keep_boundaries else 0, batch, d, n, dtype=torch.float32)
        y = torch.empty(batch, d, L, device=u.device, dtype=torch.float32)
        buffers = _Buffers(u, tiling, d, n)
        for b0 in range(0, batch, tiling.block):
            b1 = min(batch, b0 + tiling.block)
            dt_b, u_b = _time_major(dt[b0:b1]), _time_major(u[b0:b1])
            dtu_b, B_b, C_b = dt_b * u_b, _time_major(B[b0:b1]), _time_major(C[b0:b1])
            y_b = torch.empty_like(dt_b)
            last = None  # the state after the previous chunk
            for c, t0 in enumerate(starts):
                t1 = min(L, t0 + tiling.steps)
                dA, h, _, _ = buffers.get(b1 - b0, t1 - t0)
                if last is None:
                    h[0].zero_()
                else:
                    h[0].copy_(last)
                y_b[t0:t1] = kernels.states(dt_b[t0:t1], dtu_b[t0:t1], A32, B_b[t0:t1], C_b[t0:t1], dA, h)
                last = h[-1]
                if keep_boundaries and c < len(boundaries):
                    boundaries[c, b0:b1] = last
            y[b0:b1] = y_b.permute(1, 2, 0)
        if D is not None:
            y.addcmul_(u.float(), D.float()[:, None])
        out = y if z is None else y * F.silu(z.float())
        ctx.save_for_backward(u, delta_raw, A, B, C, D, z, delta_bias, None if z is None else y, boundaries)
        ctx.delta_softplus = delta_softplus
        ctx.delta_dtype = delta.dtype
        ctx.kernels = kernels
        return out.to(u.dtype)

    @staticmethod
    def backward(ctx, grad_out):
        u, delta_raw, A, B, C, D, z, delta_bias, y, boundaries = ctx.saved_tensors
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
        tiling = _Tiling.of(L, d, n, u.device)
        starts = range(0, L, tiling.steps)
        buffers = _Buffers(u, tiling, d, n)
        for b0 in range(0, batch, tiling.block):
            b1 = min(batch, b0 + tiling.block)
            dt_b, u_b = _time_major(dt[b0:b1]), _time_major(u32[b0:b1])
            dtu_b, B_b, C_b = dt_b * u_b, _time_major(B[b0:b1]), _time_major(C[b0:b1])
            grad_y_b = _time_major(grad_y[b0:b1])
            g_dt, g_u = torch.empty_like(dt_b), torch.empty_like(dt_b)
            g_B, g_C = torch.empty_like(B_b), torch.empty_like(C_b)
            for c in range(len(starts) - 1, -1, -1):
                t0, t1 = starts[c], min(L, starts[c] + tiling.steps)
                dA, h, grad_h, carry = buffers.get(b1 - b0, t1 - t0)
                if c == 0:
                    h[0].zero_()
                else:
                    h[0].copy_(boundaries[c - 1, b0:b1])
                if c == len(starts) - 1:
                    carry.zero_()
                chunk = slice(t0, t1)
                ctx.kernels.states(dt_b[chunk], dtu_b[chunk], A32, B_b[chunk], C_b[chunk], dA, h)
                g_dt[chunk], g_u[chunk], g_A, g_B[chunk], g_C[chunk] = ctx.kernels.grads(
                    dt_b[chunk], dtu_b[chunk], u_b[chunk], A32, B_b[chunk], C_b[chunk], dA, h,
                    grad_y_b[chunk], grad_h, carry)
                grad_A += g_A
            grad_delta[b0:b1] = g_dt.permute(1, 2, 0)
            grad_u[b0:b1] = g_u.permute(1, 2, 0)
            grad_B[b0:b1] = g_B.permute(1, 2, 0)
            grad_C[b0:b1] = g_C.permute(1, 2, 0)
        grad_D = None
        if D is not None:
            grad_u.addcmul_(grad_y, D.float()[:, None])
            grad_D = (grad_y * u32).sum(dim=(0, 2)).to(D.dtype)
        if ctx.delta_softplus:
            grad_delta.mul_(torch.sigmoid(delta_raw))
        grad_bias = None if delta_bias is None else grad_delta.sum(dim=(0, 2)).to(delta_bias.dtype)
        return (grad_u.to(u.dtype), grad_delta.to(ctx.delta_dtype), grad_A.to(A.dtype),
                grad_B.to(B.dtype), grad_C.to(C.dtype), grad_D, grad_z, grad_bias, None, None)
