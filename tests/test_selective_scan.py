"""Every selective-scan backend against the naive per-step loop, forward and all gradients."""

import pytest
import torch
import torch.nn.functional as F

from mdaf_dist.models import cpu_kernels
from mdaf_dist.models import selective_scan as scan_module
from mdaf_dist.models.selective_scan import BACKENDS, resolve_backend, selective_scan

INPUT_NAMES = ("u", "delta", "A", "B", "C", "D", "z", "delta_bias")
# the intra-op threads the suite runs with, restored after a test that sets its own
THREADS = torch.get_num_threads()


def random_inputs(batch=5, d_inner=6, length=9, d_state=4, padded_steps=3, seed=0, device="cpu"):
    """Random scan inputs; the first ``padded_steps`` steps of every other sequence have delta = 0."""
    g = torch.Generator().manual_seed(seed)
    u = torch.randn(batch, d_inner, length, generator=g)
    delta = torch.rand(batch, d_inner, length, generator=g)
    delta[::2, :, :padded_steps] = 0.0
    A = -torch.rand(d_inner, d_state, generator=g) * 2 - 0.1
    B = torch.randn(batch, d_state, length, generator=g)
    C = torch.randn(batch, d_state, length, generator=g)
    D = torch.randn(d_inner, generator=g)
    z = torch.randn(batch, d_inner, length, generator=g)
    delta_bias = torch.randn(d_inner, generator=g) * 0.1
    return {k: v.to(device) for k, v in zip(INPUT_NAMES, (u, delta, A, B, C, D, z, delta_bias))}


def run_scan(inputs, backend, delta_softplus, grad_seed=1):
    """Output and the gradient of every input of a random linear function of it."""
    leaves = {k: v.clone().requires_grad_() for k, v in inputs.items()}
    y = selective_scan(**leaves, delta_softplus=delta_softplus, backend=backend)
    weight = torch.randn(y.shape, generator=torch.Generator().manual_seed(grad_seed)).to(y.device)
    (y * weight).sum().backward()
    return y.detach(), {k: v.grad for k, v in leaves.items()}


def assert_matches_reference(backend, inputs, delta_softplus):
    y_ref, grads_ref = run_scan(inputs, "reference", delta_softplus)
    y, grads = run_scan(inputs, backend, delta_softplus)
    torch.testing.assert_close(y, y_ref, rtol=1e-5, atol=1e-5)
    # the gradients of delta, A, B and C are fp32 sums over L x N terms, added in an order that
    # the kernel's vectorisation sets (7.4e-5 of 3.0 seen with AVX-512), hence a looser bound
    for name in inputs:
        torch.testing.assert_close(grads[name], grads_ref[name], rtol=1e-4, atol=1e-4,
                                   msg=lambda message: f"grad of {name}: {message}")


def require_fused_kernel():
    """Skip (saying why) where the fused kernel cannot be built; builds it once per machine."""
    try:
        cpu_kernels.load()
    except cpu_kernels.ExtensionUnavailable as error:
        pytest.skip(f"fused CPU kernel unavailable: {error}")


# batch, d_inner, length, d_state, padded_steps: odd lengths, L 1, N 16 and 32 (the kernel's
# unrolled paths) and others (its generic path), padded steps up to all but one; d_inner of one
# partial block of 16 channels (a vector's lanes), one whole block, and several with a partial last
FUSED_SHAPES = [(5, 6, 9, 4, 3), (3, 5, 1, 5, 0), (2, 3, 17, 32, 16), (4, 7, 13, 16, 5), (3, 4, 11, 40, 2),
                (2, 16, 7, 32, 3), (3, 37, 5, 16, 1), (2, 33, 6, 3, 2)]
OPTIONAL_SETS = [("D", "z", "delta_bias"), (), ("D",), ("z",), ("delta_bias",)]


@pytest.mark.parametrize("shape", FUSED_SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("optional", OPTIONAL_SETS, ids=lambda names: "+".join(names) or "none")
@pytest.mark.parametrize("delta_softplus", [True, False])
def test_fused_backend_matches_reference(shape, optional, delta_softplus):
    require_fused_kernel()
    batch, d_inner, length, d_state, padded_steps = shape
    inputs = random_inputs(batch, d_inner, length, d_state, padded_steps, seed=sum(shape))
    inputs = {k: v for k, v in inputs.items() if k in ("u", "delta", "A", "B", "C") + optional}
    assert_matches_reference("fused_cpu", inputs, delta_softplus)


def masked_reference(inputs, mask, delta_softplus, last_only):
    """The reference loop on step sizes formed here: softplus(delta + bias) (softplus optional)
    times the mask, delta from its low-rank factor where inputs have delta_proj, and the last
    step's output alone with last_only."""
    inputs = dict(inputs)
    delta = inputs.pop("delta")
    if "delta_proj" in inputs:
        delta = torch.einsum("dr,brl->bdl", inputs.pop("delta_proj"), delta)
    dt = delta + inputs.pop("delta_bias")[:, None]
    dt = (F.softplus(dt) if delta_softplus else dt) * mask[:, None, :]
    y = scan_module.selective_scan_reference(delta=dt, **inputs)
    return y[..., -1] if last_only else y


@pytest.mark.parametrize("shape", FUSED_SHAPES[:5], ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("last_only", [True, False], ids=["last_only", "all_steps"])
@pytest.mark.parametrize("delta_softplus", [True, False])
@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("rank", [0, 3], ids=["full_delta", "low_rank_delta"])
def test_fused_backend_applies_mask_last_only_and_delta_proj(shape, last_only, delta_softplus, threads, rank):
    """mask, last_only and a low-rank delta inside the kernel: output and every gradient against
    the reference loop on step sizes formed outside it, with right-aligned masks (empty and full
    sequences among them) and, under the softplus, delta + bias beyond its threshold 20 and far
    below 0."""
    require_fused_kernel()
    batch, d_inner, length, d_state, _ = shape
    inputs = random_inputs(batch, d_inner, length, d_state, 0, seed=sum(shape) + 7)
    if rank:
        g = torch.Generator().manual_seed(rank)
        inputs["delta_proj"] = torch.randn(d_inner, rank, generator=g) / rank**0.5
        inputs["delta"] = torch.randn(batch, rank, length, generator=g).abs()
    if delta_softplus:  # without it, negative steps would make the states grow
        inputs["delta"] = inputs["delta"] * 4 - 2
        inputs["delta"][0, 0, :] = torch.linspace(-40.0, 40.0, length)
    lengths = torch.arange(batch) * length // max(batch - 1, 1)  # 0 .. length real steps
    mask = torch.arange(length) >= (length - lengths)[:, None]
    results = {}
    for backend in ("reference", "fused_cpu"):
        leaves = {k: v.clone().requires_grad_() for k, v in inputs.items()}
        torch.set_num_threads(threads)
        try:
            if backend == "reference":
                y = masked_reference(leaves, mask, delta_softplus, last_only)
            else:
                y = selective_scan(**leaves, delta_softplus=delta_softplus, backend=backend, mask=mask, last_only=last_only)
        finally:
            torch.set_num_threads(THREADS)
        weight = torch.randn(y.shape, generator=torch.Generator().manual_seed(3))
        (y * weight).sum().backward()
        results[backend] = {"out": y.detach(), **{k: v.grad for k, v in leaves.items()}}
    assert results["fused_cpu"]["out"].shape == ((batch, d_inner) if last_only else (batch, d_inner, length))
    for name, want in results["reference"].items():
        torch.testing.assert_close(results["fused_cpu"][name], want, rtol=1e-4, atol=1e-5,
                                   msg=lambda message: f"{name}: {message}")


@pytest.mark.parametrize("backend", ["reference", "cpu"])
def test_other_backends_apply_mask_last_only_and_delta_proj_around_the_scan(backend):
    inputs = random_inputs(batch=4, d_inner=5, length=6, d_state=3, padded_steps=0, seed=21)
    inputs["delta_proj"], inputs["delta"] = torch.randn(5, 2), torch.randn(4, 2, 6)
    mask = torch.arange(6) >= torch.tensor([6, 4, 1, 0])[:, None]
    y = selective_scan(**inputs, delta_softplus=True, backend=backend, mask=mask, last_only=True)
    torch.testing.assert_close(y, masked_reference(inputs, mask, True, True), rtol=1e-5, atol=1e-6)


def test_fused_backend_reads_strided_views():
    """The Mamba block passes [B, L, d] tensors as [B, d, L] views and B, C as slices: no copies."""
    require_fused_kernel()
    inputs = random_inputs(batch=4, d_inner=6, length=7, d_state=5, seed=11)
    strided = {k: v.transpose(1, 2).contiguous().transpose(1, 2) if k in ("u", "delta", "z") else v
               for k, v in inputs.items()}
    bc = torch.cat([inputs["B"], inputs["C"], torch.zeros_like(inputs["C"])], dim=1).transpose(1, 2).contiguous()
    strided["B"], strided["C"] = bc[..., :5].transpose(1, 2), bc[..., 5:10].transpose(1, 2)
    assert not strided["u"].is_contiguous() and not strided["B"].is_contiguous()
    y_ref, grads_ref = run_scan(inputs, "reference", True)
    y, grads = run_scan(strided, "fused_cpu", True)
    torch.testing.assert_close(y, y_ref, rtol=1e-5, atol=1e-5)
    for name in INPUT_NAMES:
        torch.testing.assert_close(grads[name], grads_ref[name], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("batch,d_inner", [(7, 6), (1, 40), (3, 35)])
def test_fused_backend_splits_the_work_over_threads(batch, d_inner):
    """Two threads: the forward splits (sample, channel block) pairs, the backward samples, and
    the threads sum their parts of grad A and grad D; one sample of three blocks splits too."""
    require_fused_kernel()
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        inputs = random_inputs(batch=batch, d_inner=d_inner, length=9, d_state=32, seed=12)
        assert_matches_reference("fused_cpu", inputs, delta_softplus=True)
    finally:
        torch.set_num_threads(threads)


def test_fused_backend_matches_reference_from_a_last_step_loss():
    """A loss on the last step alone (what Mamba4Rec reads) with fast decays: the gradient reaching
    earlier states falls to denormal sizes, which the kernel flushes to zero, and every gradient
    still matches the reference."""
    require_fused_kernel()
    inputs = random_inputs(batch=3, d_inner=20, length=40, d_state=32, padded_steps=5, seed=13)
    inputs["A"] = -torch.arange(1.0, 33.0).expand(20, 32).contiguous()  # S4D-real: decays down to exp(-32 delta)
    inputs["delta"] = inputs["delta"] + 0.5
    results = {}
    for backend in ("reference", "fused_cpu"):
        leaves = {k: v.clone().requires_grad_() for k, v in inputs.items()}
        y = selective_scan(**leaves, delta_softplus=True, backend=backend)
        y[..., -1].square().sum().backward()
        results[backend] = [y.detach()] + [leaves[k].grad for k in inputs]
    for got, want in zip(results["fused_cpu"], results["reference"]):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)


def test_flop_counter_counts_the_fused_kernels():
    """`mdaf profile` counts FLOPs with FlopCounterMode: the fused ops count by their formulas."""
    from torch.utils.flop_counter import FlopCounterMode

    require_fused_kernel()
    inputs = random_inputs(batch=3, d_inner=5, length=7, d_state=4)
    x, weight_t, bias = torch.randn(3, 7, 5), torch.randn(4, 5), torch.randn(5)
    low_rank = {**inputs, "delta": torch.rand(3, 2, 7), "delta_proj": torch.randn(5, 2)}
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        selective_scan(**inputs, backend="fused_cpu")
        selective_scan(**low_rank, backend="fused_cpu")  # dt_proj's product counted too
        cpu_kernels.load().causal_conv_silu_fwd(x, weight_t, bias, None)
    assert counter.get_total_flops() == 8 * 3 * 5 * 7 * 4 + (8 * 4 + 2 * 2) * 3 * 5 * 7 + 2 * 3 * 7 * 5 * 4


def test_auto_picks_fused_backend_on_cpu():
    require_fused_kernel()
    assert resolve_backend("auto", torch.device("cpu")) == "fused_cpu"


def unbuildable(monkeypatch):
    """Make the kernel fail to load, as on a machine without a compiler."""
    def fail():
        raise cpu_kernels.ExtensionUnavailable("no C++ compiler")

    monkeypatch.setattr(cpu_kernels, "load", fail)
    cpu_kernels.available.cache_clear()


def test_auto_falls_back_to_cpu_saying_why_once(monkeypatch, capsys):
    unbuildable(monkeypatch)
    try:
        assert resolve_backend("auto", torch.device("cpu")) == "cpu"
        assert resolve_backend("auto", torch.device("cpu")) == "cpu"
        selective_scan(**random_inputs(), backend="auto")
    finally:
        cpu_kernels.available.cache_clear()  # the real kernel again for later tests
    assert capsys.readouterr().err.splitlines() == [
        "mdaf_dist: fused CPU kernels unavailable (no C++ compiler); using the 'cpu' scan backend"]


def test_fused_backend_named_explicitly_fails_with_the_reason(monkeypatch):
    unbuildable(monkeypatch)
    try:
        with pytest.raises(cpu_kernels.ExtensionUnavailable, match="no C\\+\\+ compiler"):
            selective_scan(**random_inputs(), backend="fused_cpu")
    finally:
        cpu_kernels.available.cache_clear()


def test_a_failed_build_reports_the_compiler_error(monkeypatch, tmp_path):
    """The one line names the compiler's error, not the build tool's last words."""
    broken = tmp_path / "broken.cpp"
    broken.write_text("#error the kernel source is broken\n")
    monkeypatch.setattr(cpu_kernels, "CSRC", tmp_path)  # newer than the build: no prebuilt library
    monkeypatch.setattr(cpu_kernels, "SOURCES", (broken,))
    monkeypatch.setattr(cpu_kernels, "NAME", "mdaf_dist_broken_kernel")
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path / "build"))
    with pytest.raises(cpu_kernels.ExtensionUnavailable, match="error: #error the kernel source is broken"):
        cpu_kernels.load.__wrapped__()


@pytest.mark.parametrize("delta_softplus", [True, False])
def test_cpu_backend_matches_reference(delta_softplus):
    assert_matches_reference("cpu", random_inputs(), delta_softplus)


def test_cpu_backend_matches_reference_across_batch_blocks(monkeypatch):
    """A batch larger than one block (and a ragged last block) gives the same result."""
    inputs = random_inputs(batch=7, seed=3)
    d_inner, d_state = inputs["u"].shape[1], inputs["A"].shape[1]
    monkeypatch.setitem(scan_module._CHUNK_STEPS, "cpu", 4)  # 9 steps: chunks of 4, 4, 1
    # blocks of 3 samples: 3, 3, 1 (the CPU budget is per intra-op thread)
    monkeypatch.setitem(scan_module._BLOCK_BYTES, "cpu", 3 * 4 * 4 * d_inner * d_state // torch.get_num_threads())
    assert_matches_reference("cpu", inputs, delta_softplus=True)


def test_cpu_backend_without_optional_inputs():
    inputs = random_inputs(seed=4)
    required = {k: inputs[k] for k in ("u", "delta", "A", "B", "C")}
    y_ref, grads_ref = run_scan(required, "reference", False)
    y, grads = run_scan(required, "cpu", False)
    torch.testing.assert_close(y, y_ref, rtol=1e-5, atol=1e-5)
    for name, grad in grads.items():
        torch.testing.assert_close(grad, grads_ref[name], rtol=1e-5, atol=1e-5)


def test_zero_delta_steps_leave_the_state_unchanged():
    """Leading delta = 0 steps do not change the outputs on the steps after them."""
    inputs = random_inputs(padded_steps=0, seed=5)
    inputs.pop("delta_bias")
    padded = {k: v.clone() for k, v in inputs.items()}
    padded["delta"][:, :, :4] = 0.0
    y_tail = selective_scan(**{k: (v[..., 4:] if v.dim() == 3 else v) for k, v in inputs.items()}, backend="cpu")
    y_padded = selective_scan(**padded, backend="cpu")
    torch.testing.assert_close(y_padded[..., 4:], y_tail, rtol=1e-5, atol=1e-5)


def test_compiled_backend_matches_reference_on_cpu():
    inputs = random_inputs(length=4, padded_steps=2, seed=6)  # few steps: compile time grows with L
    try:
        selective_scan(**inputs, backend="compiled")
    except torch._dynamo.exc.BackendCompilerFailed as error:
        pytest.skip(f"torch.compile cannot build CPU kernels here: {error}")
    assert_matches_reference("compiled", inputs, delta_softplus=True)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("backend", ["compiled", "auto"])
def test_cuda_backends_match_reference(backend):
    assert_matches_reference(backend, random_inputs(seed=7, device="cuda"), delta_softplus=True)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error raised without CUDA")
def test_mamba_ssm_backend_refuses_cpu_tensors():
    with pytest.raises(ValueError, match="selective-scan backend 'mamba_ssm' needs the mamba_ssm package and CUDA"):
        selective_scan(**random_inputs(), backend="mamba_ssm")


def test_unknown_backend_names_the_choices():
    with pytest.raises(ValueError, match="unknown selective-scan backend 'triton'; choose one of "
                                         + ", ".join(BACKENDS)):
        selective_scan(**random_inputs(), backend="triton")
