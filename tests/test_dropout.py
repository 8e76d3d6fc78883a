"""HashDropout: nn.Dropout's distribution from a hashed mask, its gradient through the same mask,
fixed by torch's seed, the same for any thread count."""

import pytest
import torch
from torch import nn

from mdaf_dist.models.dropout import HashDropout
from tests.test_selective_scan import THREADS, require_fused_kernel


def dropped(p=0.15, shape=(64, 50, 64), seed=0, threads=1):
    """(input, output, input gradient of sum(output * w), w) of one training-mode call."""
    require_fused_kernel()
    torch.manual_seed(seed)
    x = torch.randn(shape).requires_grad_()
    weight = torch.randn(shape)
    torch.set_num_threads(threads)
    try:
        y = HashDropout(p)(x)
        (y * weight).sum().backward()
    finally:
        torch.set_num_threads(THREADS)
    return x.detach(), y.detach(), x.grad, weight


@pytest.mark.parametrize("p", [0.15, 0.5, 0.9])
def test_keeps_each_element_with_probability_one_minus_p_and_scales_it(p):
    x, y, grad, weight = dropped(p)
    kept = y != 0
    n = x.numel()
    # the kept count is Binomial(n, 1 - p): within 5 standard deviations
    assert abs(kept.sum().item() - n * (1 - p)) < 5 * (n * p * (1 - p)) ** 0.5
    torch.testing.assert_close(y[kept], x[kept] / (1 - p), rtol=1e-6, atol=0)
    # the gradient goes through the same mask, scaled alike
    torch.testing.assert_close(grad, weight * kept / (1 - p), rtol=1e-6, atol=0)


def test_neighbouring_elements_are_independent():
    _, y, _, _ = dropped(0.5, shape=(1 << 20,))
    kept = (y != 0).float()
    both = (kept[1:] * kept[:-1]).mean().item()
    assert abs(both - 0.25) < 5 * (0.25 * 0.75 / kept.numel()) ** 0.5


def test_the_mask_follows_torch_seed_and_not_the_thread_count():
    _, first, _, _ = dropped(seed=3, threads=1)
    _, again, _, _ = dropped(seed=3, threads=2)
    _, other, _, _ = dropped(seed=4)
    assert torch.equal(first != 0, again != 0)
    assert not torch.equal(first != 0, other != 0)
    torch.manual_seed(3)
    module, x = HashDropout(0.15), torch.randn(8, 8)
    assert not torch.equal(module(x), module(x))  # each call draws its own seed


def test_evaluation_and_other_devices_or_dtypes_are_nn_dropout():
    x = torch.randn(16, 16)
    module = HashDropout(0.3).eval()
    assert torch.equal(module(x), x)
    module.train()
    torch.manual_seed(5)
    expected = nn.Dropout(0.3)(x.double())
    torch.manual_seed(5)
    assert torch.equal(module(x.double()), expected)


def test_bad_p_is_refused_by_the_kernel():
    require_fused_kernel()
    from mdaf_dist.models import cpu_kernels

    with pytest.raises(RuntimeError, match=r"hash dropout: p must be in \[0, 1\), got 1"):
        cpu_kernels.load().hash_dropout(torch.randn(3), 0, 1.0)
