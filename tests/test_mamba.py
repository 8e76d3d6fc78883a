"""The Mamba block: mamba_ssm's parameter layout, its initialisation, padding that does not leak."""

import math

import pytest
import torch
import torch.nn.functional as F

from mdaf_dist.models.mamba import Mamba, _InProjection
from mdaf_dist.models.mamba4rec import Mamba4RecLayer
from tests.test_selective_scan import require_fused_kernel


def test_state_dict_has_mamba_ssm_names_and_shapes():
    """mamba_ssm.Mamba(d_model=64, d_state=32, d_conv=4, expand=2): d_inner 128, dt_rank 4."""
    expected = [
        ("A_log", (128, 32)),
        ("D", (128,)),
        ("in_proj.weight", (256, 64)),
        ("conv1d.weight", (128, 1, 4)),
        ("conv1d.bias", (128,)),
        ("x_proj.weight", (4 + 2 * 32, 128)),
        ("dt_proj.weight", (128, 4)),
        ("dt_proj.bias", (128,)),
        ("out_proj.weight", (64, 128)),
    ]
    state = Mamba(64, d_state=32, d_conv=4, expand=2).state_dict()
    assert [(name, tuple(t.shape)) for name, t in state.items()] == expected


def test_state_dict_round_trips():
    source, target = Mamba(16, d_state=8), Mamba(16, d_state=8)
    target.load_state_dict(source.state_dict())
    x = torch.randn(2, 5, 16)
    torch.testing.assert_close(target(x), source(x))


def test_initialisation_follows_mamba_ssm():
    block = Mamba(40, d_state=6, dt_min=0.002, dt_max=0.05)
    assert block.dt_rank == math.ceil(40 / 16)
    torch.testing.assert_close(-torch.exp(block.A_log), -torch.arange(1.0, 7.0).expand(80, 6))
    torch.testing.assert_close(block.D.detach(), torch.ones(80))
    dt = F.softplus(block.dt_proj.bias.detach())
    assert dt.min() >= 0.002 * (1 - 1e-5) and dt.max() <= 0.05 * (1 + 1e-5)
    bound = block.dt_rank ** -0.5
    assert block.dt_proj.weight.abs().max() <= bound


@pytest.mark.parametrize("backend", ["reference", "cpu", "fused_cpu"])
def test_real_steps_do_not_depend_on_left_padding(backend):
    if backend == "fused_cpu":
        require_fused_kernel()
    torch.manual_seed(0)
    block = Mamba(8, d_state=4, scan_backend=backend)
    sequence = torch.randn(1, 6, 8)
    unpadded = block(sequence, mask=torch.ones(1, 6, dtype=torch.bool))
    for pad in (1, 3, 10):
        x = torch.cat([torch.randn(1, pad, 8) * 5, sequence], dim=1)  # garbage on padded steps
        mask = torch.arange(pad + 6).unsqueeze(0) >= pad
        torch.testing.assert_close(block(x, mask=mask)[:, pad:], unpadded, rtol=1e-5, atol=1e-6)


def test_padding_matters_without_a_mask():
    """The invariance above is the mask's doing: unmasked padding changes the real steps."""
    torch.manual_seed(0)
    block = Mamba(8, d_state=4)
    sequence = torch.randn(1, 6, 8)
    padded = torch.cat([torch.randn(1, 3, 8), sequence], dim=1)
    assert not torch.allclose(block(padded)[:, 3:], block(sequence), atol=1e-4)


@pytest.mark.parametrize("backend,d_model,threads", [("cpu", 16, 1), ("fused_cpu", 16, 1), ("fused_cpu", 12, 2)])
def test_backend_matches_reference_through_the_block(backend, d_model, threads):
    """Output, input gradient and every parameter gradient (conv1d's too: fused_cpu fuses the conv),
    with padded sequences; d_inner 24 has a channel tail past whole 16-lane vectors."""
    if backend == "fused_cpu":
        require_fused_kernel()
    previous_threads = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        run_block_against_reference(backend, d_model)
    finally:
        torch.set_num_threads(previous_threads)


def run_block_against_reference(backend, d_model):
    torch.manual_seed(0)
    block = Mamba(d_model, d_state=8, scan_backend="reference")
    x = torch.randn(3, 7, d_model, requires_grad=True)
    mask = torch.arange(7).unsqueeze(0) >= torch.tensor([[0], [2], [5]])
    results = {}
    for backend_name in ("reference", backend):
        block.scan_backend = backend_name
        block.zero_grad()
        x.grad = None
        out = block(x, mask=mask)
        out.pow(2).sum().backward()
        results[backend_name] = [out.detach(), x.grad.clone()] + [p.grad.clone() for p in block.parameters()]
    for got, want in zip(results[backend], results["reference"]):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_in_projection_gradients_match_finite_differences():
    """in_proj's two halves, x's gradient added into one product by the other (addmm): gradcheck in fp64."""
    x = torch.randn(2, 3, 4, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(6, 4, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(_InProjection.apply, (x, weight))


def test_unknown_scan_backend_is_rejected_at_construction():
    with pytest.raises(ValueError, match="unknown selective-scan backend 'fast'"):
        Mamba(8, scan_backend="fast")


@pytest.mark.parametrize("module", ["block", "layer"])
def test_last_only_is_the_last_step_of_the_full_output(module):
    """Mamba(last_only=True) and the Mamba4Rec layer built on it: the last step's output and the
    same gradients as taking [:, -1] of the full [B, L, D] output."""
    torch.manual_seed(0)
    if module == "block":
        net = Mamba(16, d_state=8, scan_backend="reference")
    else:
        net = Mamba4RecLayer(16, d_state=8, d_conv=4, expand=2, dropout=0.0, scan_backend="reference")
    x = torch.randn(3, 7, 16, requires_grad=True)
    mask = torch.arange(7).unsqueeze(0) >= torch.tensor([[0], [2], [5]])
    results = []
    for last_only in (False, True):
        net.zero_grad()
        x.grad = None
        out = net(x, mask, last_only=last_only)
        out = out if last_only else out[:, -1]
        out.pow(2).sum().backward()
        results.append([out.detach(), x.grad.clone()] + [p.grad.clone() for p in net.parameters()])
    for got, want in zip(results[1], results[0]):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
