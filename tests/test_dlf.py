"""DLF (DLF_paper.md) and the token fusions: shapes, parameter counts against the paper's matrices,
eqs. 5-7 and 9 by hand, one whole layer (eqs. 5-15 and 9) and NAF against NumPy written from the
equations, gradients reaching every parameter, and `mdaf describe` beside the formulas."""

import numpy as np
import pytest
import torch
from scipy.special import softmax

from mdaf_dist.config import ConfigError, ModelConfig
from mdaf_dist.models.dlf import GATE_EPS, DLFLayer, DLFStack, DLFStaticBranch, NetworkAwareAttention
from mdaf_dist.models.fusion import CrossAttentionFusion, DLFNAFFusion
from mdaf_dist.models.registry import build_model
# float64_defaults: test_parity's autouse fixture, so that 1e-6 measures the equations, not rounding
from tests.test_parity import close, describe_row, float64_defaults, hand_set, layer_norm  # noqa: F401

B, R, D = 4, 3, 8


def count(module):
    return sum(p.numel() for p in module.parameters())


# --- the paper's matrices, counted ------------------------------------------------------------


def naf_parameters(d, blocks, rounds):
    """Per round: f_att (d -> 3d with bias) and, for each block M, W^C_M in R^{d x (n-1)d} and
    b^C_M (eqs. 10, 12); then W_F in R^{d x nd} and b_F (eq. 14)."""
    return rounds * (3 * d * d + 3 * d + blocks * ((blocks - 1) * d * d + d)) + blocks * d * d + d


def dlf_layer_parameters(r, d, rounds, layer_norm):
    eq5 = r * d + d * d + d  # W_LI in R^{R x d}, W_LO in R^{d x d}, b_L
    eq6 = r * d + d * d + d  # W_CI, W_CO, b_C
    eq7 = d * d + d  # W_D, b_D
    eq9 = d * d  # W_Gate, no bias
    eq15 = 4 * d * d + d  # W_Z, b_Z: [Z_L; Z_C; Z_D; Att] back to d
    return eq5 + eq6 + eq7 + eq9 + naf_parameters(d, 3, rounds) + eq15 + (2 * d if layer_norm else 0)


@pytest.mark.parametrize("rounds, with_norm", [(1, False), (2, True)])
def test_dlf_layer_shape_and_parameters_follow_the_papers_matrices(rounds, with_norm):
    layer = DLFLayer(R, D, rounds, with_norm)
    e1 = torch.randn(B, R, D)
    assert layer(torch.randn(B, R, D), e1).shape == (B, R, D)
    assert [z.shape for z in layer.interaction_blocks(e1, e1)] == [(B, R, D)] * 3
    assert count(layer) == dlf_layer_parameters(R, D, rounds, with_norm)
    assert count(layer.naf) == naf_parameters(D, 3, rounds)


def test_dlf_at_the_papers_sizes():
    """D = 64, L = 8 layers, 2 attention rounds: 120,384 parameters a layer; eq. 16 adds 3D + 1."""
    assert dlf_layer_parameters(3, 64, 2, True) == 120_384
    model = build_model(ModelConfig(name="dlf"), {"user": 5, "item": 5, "category": 5}, embedding_backend="plain")
    assert len(model.dlf.layers) == 8
    assert count(model) - count(model.embeddings) == 8 * dlf_layer_parameters(3, 64, 2, True) + 3 * 64 + 1


def test_naf_shapes_and_last_only_rows():
    naf = NetworkAwareAttention(D, num_blocks=2)
    blocks = [torch.randn(B, 4, D), torch.randn(B, 6, D)]
    mask = torch.ones(B, 6, dtype=torch.bool)
    assert naf(blocks[:1] * 2).shape == (B, 4, D)
    # with equal token counts every row is computed; last_only gives the last row alone, the same
    four = [blocks[0], blocks[1][:, -4:]]
    last = naf(four, [None, mask[:, -4:]], last_only=True)
    assert last.shape == (B, 1, D)
    torch.testing.assert_close(last[:, 0], naf(four, [None, mask[:, -4:]])[:, -1])


def test_static_branch_and_fusion_shapes_and_parameters():
    assert DLFStaticBranch(3 * D, D, 3, 2, 1)(torch.randn(B, 3 * D)).shape == (B, D)
    h_static, h_seq = torch.randn(B, D), torch.randn(B, D)
    tokens = dict(static_tokens=torch.randn(B, 4, D), seq_tokens=torch.randn(B, 5, D), seq_mask=torch.ones(B, 5, dtype=torch.bool))
    for direction, directions in (("seq_to_static", 1), ("static_to_seq", 1), ("both", 2)):
        fusion = CrossAttentionFusion(D, 2, 0.0, direction)
        h, gate = fusion(h_static, h_seq, **tokens)
        assert h.shape == (B, D) and gate is None
        # per direction: W_Q, W_K, W_V, W_O with biases (4D^2 + 4D) and a LayerNorm (2D); then W, b (2D^2 + D)
        assert count(fusion) == directions * (4 * D * D + 4 * D + 2 * D) + 2 * D * D + D
    naf = DLFNAFFusion(D)
    h, gate = naf(h_static, h_seq, **tokens)
    assert h.shape == (B, 3 * D) and naf.out_dim == 3 * D and gate is None
    torch.testing.assert_close(h[:, :2 * D], torch.cat([h_static, h_seq], dim=1))  # eq. 15 keeps the blocks
    assert count(naf) == naf_parameters(D, 2, 1) == 7 * D * D + 6 * D


def test_cross_attention_parameters_at_the_papers_size_are_three_gates():
    """5.3: the attention fusion has "3x more parameters" than the gate (8,321 at D = 64)."""
    assert count(CrossAttentionFusion(64, 2, 0.0, "seq_to_static")) / 8_321 == pytest.approx(3.0, abs=0.01)


# --- the equations by hand and in NumPy (float64) ---------------------------------------------


@torch.no_grad()
def test_low_rank_block_by_hand():
    """Eq. 5 with R = 2 tokens, d = 2: row j of E1 E^T W_LI is sum_i <e1_j, e_i> w_i.
    E1 = [[1, 0], [0, 1]], E = [[1, 2], [3, -1]], W_LI = [[1, 0], [0, 1]] (w_0 = (1, 0), w_1 = (0, 1)):
      row 0: <(1,0),(1,2)> = 1, <(1,0),(3,-1)> = 3 -> 1 w_0 + 3 w_1 = (1, 3)
      row 1: <(0,1),(1,2)> = 2, <(0,1),(3,-1)> = -1 -> 2 w_0 - 1 w_1 = (2, -1)
    W_LO = [[1, 1], [0, 2]], b_L = (0, -1): (1, 3) -> (4, 5), (2, -1) -> (1, -3); ReLU -> (4, 5), (1, 0).
    Eq. 6 (E in place of E1), W_CI = W_LI, W_CO = I, b_C = 0:
      row 0: <(1,2),(1,2)> = 5, <(1,2),(3,-1)> = 1 -> (5, 1); row 1: 1, 10 -> (1, 10).
    Eq. 7 with W_D = [[1, -1], [0, 1]], b_D = (0, 1): (1,2) -> (-1, 3) -> (0, 3); (3,-1) -> (4, 0) -> (4, 0)."""
    layer = DLFLayer(2, 2, 1)
    layer.low_in.copy_(torch.eye(2))
    layer.low_out.weight.copy_(torch.tensor([[1.0, 1.0], [0.0, 2.0]]))
    layer.low_out.bias.copy_(torch.tensor([0.0, -1.0]))
    layer.high_in.copy_(torch.eye(2))
    layer.high_out.weight.copy_(torch.eye(2))
    layer.high_out.bias.zero_()
    layer.implicit.weight.copy_(torch.tensor([[1.0, -1.0], [0.0, 1.0]]))
    layer.implicit.bias.copy_(torch.tensor([0.0, 1.0]))
    e1 = torch.tensor([[[1.0, 0.0], [0.0, 1.0]]])
    e = torch.tensor([[[1.0, 2.0], [3.0, -1.0]]])
    z_low, z_high, z_implicit = layer.interaction_blocks(e, e1)
    close(z_low[0], np.array([[4.0, 5.0], [1.0, 0.0]]))
    close(z_high[0], np.array([[5.0, 1.0], [1.0, 10.0]]))
    close(z_implicit[0], np.array([[0.0, 3.0], [4.0, 0.0]]))


def linear(x, p, name):
    return x @ p[f"{name}.weight"].T + (p[f"{name}.bias"] if f"{name}.bias" in p else 0)


def relu(x):
    return np.maximum(x, 0)


def attention(q, k, v, mask=None):
    """softmax(q k^T / sqrt(d)) v; masked keys get -inf; no key at all gives zeros."""
    scores = q @ np.swapaxes(k, -1, -2) / np.sqrt(q.shape[-1])
    if mask is None:
        return softmax(scores, axis=-1) @ v
    has_key = mask.any(-1)[:, None, None]
    scores = np.where(mask[:, None, :], scores, -np.inf)
    return softmax(np.where(has_key, scores, 0.0), axis=-1) * has_key @ v


def naf_reference(p, prefix, blocks, rounds, masks=None, last_only=False):
    """Eqs. 10-14 written out: Q, K, V = Split(f_att(Z_M)); Att^C_M = ReLU(W^C_M [A_MX V_X; ...] + b^C_M);
    Att^S_M = softmax(Q_M K_M^T / sqrt d) V_M; Att = ReLU(W_F [Att^C_1 + Att^S_1; ...] + b_F)."""
    masks = masks or [None] * len(blocks)
    for r in range(rounds):
        qkv = [linear(z, p, f"{prefix}.qkv.{r}") for z in blocks]
        d = blocks[0].shape[-1]
        q, k, v = [x[..., :d] for x in qkv], [x[..., d : 2 * d] for x in qkv], [x[..., 2 * d :] for x in qkv]
        if last_only:
            q = [x[:, -1:] for x in q]
        out = []
        for m in range(len(blocks)):
            others = np.concatenate([attention(q[m], k[x], v[x], masks[x]) for x in range(len(blocks)) if x != m], -1)
            out.append(relu(linear(others, p, f"{prefix}.cross.{r}.{m}")) + attention(q[m], k[m], v[m], masks[m]))
        blocks = out
    return relu(linear(np.concatenate(blocks, -1), p, f"{prefix}.fuse"))


@pytest.mark.parametrize("with_norm", [False, True])
def test_dlf_layer_matches_the_equations(with_norm):
    layer = DLFLayer(R, 4, attention_layers=2, layer_norm=with_norm)
    p = hand_set(layer)
    rng = np.random.default_rng(2)
    e1, e = rng.normal(size=(B, R, 4)), rng.normal(size=(B, R, 4))
    z_low = relu(linear(e1 @ np.swapaxes(e, -1, -2) @ p["low_in"], p, "low_out"))  # eq. 5
    z_high = relu(linear(e @ np.swapaxes(e, -1, -2) @ p["high_in"], p, "high_out"))  # eq. 6
    z_implicit = relu(linear(e, p, "implicit"))  # eq. 7
    att = naf_reference(p, "naf", [z_low, z_high, z_implicit], rounds=2)  # eqs. 10-14
    z = linear(np.concatenate([z_low, z_high, z_implicit, att], -1), p, "combine")  # eq. 15 -> d
    expected = z + np.maximum(GATE_EPS, linear(e, p, "gate")) * e  # eq. 9
    if with_norm:
        expected = layer_norm(expected, p["norm.weight"], p["norm.bias"], 1e-5)
    close(layer(torch.as_tensor(e), torch.as_tensor(e1)), expected)


def test_gated_residual_by_hand():
    """Eq. 9, E^(l+1) = Z + max(eps, W_Gate E) * E, with every weight zero but W_Gate = [[1, 0], [0, -1]]
    and eq. 15's b_Z = (1, 2): the blocks and NAF give 0, so Z = b_Z. For the token e = (2, 3):
    W_Gate e = (2, -3) -> max(eps, .) = (2, eps) -> * e = (4, 3 eps) -> + Z = (5, 2 + 3 eps);
    for e = (-1, 1): W_Gate e = (-1, -1) -> (eps, eps) -> (-eps, eps) -> (1 - eps, 2 + eps)."""
    layer = DLFLayer(2, 2, 1, layer_norm=False)
    with torch.no_grad():
        for p in layer.parameters():
            p.zero_()
        layer.gate.weight.copy_(torch.tensor([[1.0, 0.0], [0.0, -1.0]]))
        layer.combine.bias.copy_(torch.tensor([1.0, 2.0]))
    e = torch.tensor([[[2.0, 3.0], [-1.0, 1.0]]])
    close(layer(e, e)[0], np.array([[5.0, 2.0 + 3 * GATE_EPS], [1.0 - GATE_EPS, 2.0 + GATE_EPS]]))


def test_naf_fusion_matches_the_equations_and_masks_padding():
    fusion = DLFNAFFusion(4)
    p = hand_set(fusion)
    rng = np.random.default_rng(3)
    static, seq = rng.normal(size=(3, 4, 4)), rng.normal(size=(3, 5, 4))
    mask = np.array([[True] * 5, [False, False, True, True, True], [False] * 5])
    seq = seq * mask[..., None]
    att = naf_reference(p, "naf", [static, seq], rounds=1, masks=[None, mask], last_only=True)[:, 0]
    h, _ = fusion(torch.as_tensor(static[:, -1]), torch.as_tensor(seq[:, -1]), static_tokens=torch.as_tensor(static),
                  seq_tokens=torch.as_tensor(seq), seq_mask=torch.as_tensor(mask))
    close(h, np.concatenate([static[:, -1], seq[:, -1], att], -1))


# --- gradients, settings, describe ------------------------------------------------------------


def test_gradients_reach_every_parameter():
    torch.manual_seed(0)
    stack = DLFStack(R, D, num_layers=3, attention_layers=2)
    stack(torch.randn(16, R, D)).pow(2).sum().backward()
    tokens = dict(static_tokens=torch.randn(16, 4, D), seq_tokens=torch.randn(16, 5, D), seq_mask=torch.rand(16, 5) > 0.3)
    modules = [stack, CrossAttentionFusion(D, 2, 0.0, "both"), DLFNAFFusion(D)]
    for fusion in modules[1:]:
        fusion(torch.randn(16, D), torch.randn(16, D), **tokens)[0].pow(2).sum().backward()
    for module in modules:
        assert [n for n, p in module.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0] == []


def test_heads_must_divide_the_width_of_the_attention_fusions():
    with pytest.raises(ConfigError, match=r"^model.num_heads=3 does not divide the attention width 16$"):
        build_model(ModelConfig(embedding_dim=16, fusion="cross_attention", num_heads=3), {"user": 5, "item": 5, "category": 5})


@pytest.mark.parametrize(
    "overrides, module, expected",
    [
        (["model.name=dlf"], "DLF layer x8", dlf_layer_parameters(3, 64, 2, True)),
        (["--config", "configs/baselines/dlf.yaml"], "DLF layer x8", dlf_layer_parameters(3, 64, 2, False)),
        (["model.static_branch=dlf", "model.dlf_layers=4", "model.dlf_attention_layers=1"], "DLF layer x4", dlf_layer_parameters(3, 64, 1, True)),
        (["model.fusion=cross_attention"], "cross_attention fusion", 4 * 64**2 + 4 * 64 + 2 * 64 + 2 * 64**2 + 64),
        (["model.fusion=cross_attention", "model.cross_attention_direction=both"], "cross_attention fusion",
         2 * (4 * 64**2 + 4 * 64 + 2 * 64) + 2 * 64**2 + 64),
        (["model.fusion=dlf_naf"], "dlf_naf fusion", naf_parameters(64, 2, 1)),
    ],
)
def test_describe_shows_the_new_modules_beside_their_formulas(capsys, overrides, module, expected):
    numbers = describe_row(capsys, overrides, module)
    assert numbers[0] == numbers[-1] == expected
