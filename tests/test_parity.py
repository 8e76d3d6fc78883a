"""Every component against its reference, numerically: a tiny fixed input, hand-set (seeded) weights,
and the expected output computed here in NumPy from the reference's own equations (published
DCNv3 / FuxiCTR, Mamba4Rec's MambaLayer, DeepCTR's CrossNetMix, AutoInt's interacting layer,
BST's transformer layer), to 1e-6; then the references' initialisations and which parameters
get weight decay."""

import numpy as np
import pytest
import torch
from scipy.special import erf, softmax
from torch import nn

from mdaf_dist.cli import main as mdaf_main
from mdaf_dist.config import ConfigError, ModelConfig, TrainConfig, load_config
from mdaf_dist.models.autoint import InteractingLayer
from mdaf_dist.models.dcn import OfficialDCNv3, SelfMaskCross
from mdaf_dist.models.mamba4rec import SequenceBranch
from mdaf_dist.models.registry import build_model
from mdaf_dist.studies.paper import AUTHORS_README_TABLE2
from mdaf_dist.train.optim import build_optimizer
from tests.test_models import features

ATOL = 1e-6


@pytest.fixture(autouse=True)
def float64_defaults():
    """The modules run in float64 so that 1e-6 measures the equations, not rounding."""
    dtype = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(dtype)


@torch.no_grad()
def hand_set(module: nn.Module, seed: int = 0, scale: float = 0.5) -> dict:
    """Every parameter uniform in [-scale, scale) from a fixed generator; the values as NumPy."""
    generator = torch.Generator().manual_seed(seed)
    for p in module.parameters():
        p.copy_((torch.rand(p.shape, generator=generator, dtype=torch.float64) * 2 - 1) * scale)
    return {name: t.detach().numpy().copy() for name, t in module.state_dict().items()}


def layer_norm(x, weight, bias, eps):
    mean = x.mean(-1, keepdims=True)
    var = ((x - mean) ** 2).mean(-1, keepdims=True)
    return (x - mean) / np.sqrt(var + eps) * weight + bias


def silu(x):
    return x / (1 + np.exp(-x))


def softplus(x):
    return np.log1p(np.exp(x))


def gelu(x):
    return 0.5 * x * (1 + erf(x / np.sqrt(2)))


def close(actual: torch.Tensor, expected: np.ndarray) -> None:
    np.testing.assert_allclose(actual.detach().numpy(), expected, rtol=0, atol=ATOL)


# --- published DCNv3 (Li et al. 2024; FuxiCTR's DCNv3, one head) --------------------------------


def dcnv3_layer(p, prefix, x, multiplier):
    """FuxiCTR: H = W x (no bias); mask = ReLU(LN(H)); x = multiplier * ([H; H * mask] + b) + x."""
    h = x @ p[f"{prefix}.linear.weight"].T
    mask = np.maximum(0, layer_norm(h, p[f"{prefix}.norm.weight"], p[f"{prefix}.norm.bias"], 1e-5))
    return multiplier * (np.concatenate([h, h * mask], -1) + p[f"{prefix}.bias"]) + x


def test_official_dcnv3_matches_the_published_layers():
    fields, dim = 3, 4
    module = OfficialDCNv3(fields * dim, 5, lcn_layers=2, ecn_layers=3).eval()
    p = hand_set(module)
    x = np.random.default_rng(1).normal(size=(4, fields * dim))
    # MultiHeadFeatureEmbedding with one head: first halves of every field, then second halves
    e = x.reshape(4, fields, dim)
    x0 = np.concatenate([e[:, :, : dim // 2].reshape(4, -1), e[:, :, dim // 2 :].reshape(4, -1)], -1)
    x_lcn = x0
    for i in range(2):
        x_lcn = dcnv3_layer(p, f"lcn.{i}", x_lcn, x0)
    x_ecn = x0
    for i in range(3):
        x_ecn = dcnv3_layer(p, f"ecn.{i}", x_ecn, x_ecn)
    h = 0.5 * (x_lcn @ p["project_lcn.weight"].T + p["project_lcn.bias"] + x_ecn @ p["project_ecn.weight"].T + p["project_ecn.bias"])
    close(module(torch.from_numpy(x)), layer_norm(h, p["norm.weight"], p["norm.bias"], 1e-5))


def test_official_dcnv3_batch_norm_normalises_w_x_over_the_batch():
    """BatchNorm1d(num_heads = 1) on [B, 1, d/2]: one mean and (biased) variance over everything."""
    layer = SelfMaskCross(6, batch_norm=True).train()
    p = hand_set(layer)
    x = np.random.default_rng(2).normal(size=(5, 6))
    h = x @ p["linear.weight"].T
    h = (h - h.mean()) / np.sqrt(h.var() + 1e-5) * p["batch_norm.weight"] + p["batch_norm.bias"]
    mask = np.maximum(0, layer_norm(h, p["norm.weight"], p["norm.bias"], 1e-5))
    close(layer(torch.from_numpy(x), torch.from_numpy(x)), x * (np.concatenate([h, h * mask], -1) + p["bias"]) + x)


def test_official_dcnv3_drops_out_after_each_cross_layer():
    """Dropout(p=1) on the layer's output zeroes it: the dropout sits after the cross layer."""
    layer = SelfMaskCross(6, dropout=1.0).train()
    x = torch.randn(3, 6)
    assert not layer(x, x).any()


def test_official_dcnv3_initialisation():
    """Every Linear xavier-normal (std sqrt(2 / (fan_in + fan_out))) with zero bias; b ~ U(0, 1)."""
    torch.manual_seed(0)
    module = OfficialDCNv3(192, 64, lcn_layers=2, ecn_layers=2)
    for layer in [*module.lcn, *module.ecn]:
        assert layer.linear.bias is None
        assert layer.linear.weight.std().item() == pytest.approx((2 / (192 + 96)) ** 0.5, rel=0.03)
        assert layer.bias.min() >= 0 and layer.bias.max() < 1 and layer.bias.mean().item() == pytest.approx(0.5, abs=0.07)
    for project in (module.project_lcn, module.project_ecn):
        assert project.weight.std().item() == pytest.approx((2 / (192 + 64)) ** 0.5, rel=0.03)
        assert not project.bias.any()


# --- Mamba4Rec (Liu et al. 2024): MambaLayer, FeedForward, _init_weights -------------------------


def mamba_block(p, prefix, x, d_state):
    """mamba_ssm.Mamba / Algorithm 1 on one sequence x [L, d_model], stepwise."""
    xz = x @ p[f"{prefix}.in_proj.weight"].T
    d_inner = xz.shape[-1] // 2
    u, z = xz[:, :d_inner], xz[:, d_inner:]
    weight = p[f"{prefix}.conv1d.weight"][:, 0, :]  # [d_inner, K], causal: step t sees t-K+1 .. t
    kernel = weight.shape[-1]
    padded = np.vstack([np.zeros((kernel - 1, d_inner)), u])
    u = silu(np.stack([(padded[t : t + kernel] * weight.T).sum(0) for t in range(len(x))]) + p[f"{prefix}.conv1d.bias"])
    dbc = u @ p[f"{prefix}.x_proj.weight"].T
    dt_rank = dbc.shape[-1] - 2 * d_state
    dt, B, C = dbc[:, :dt_rank], dbc[:, dt_rank : dt_rank + d_state], dbc[:, dt_rank + d_state :]
    delta = softplus(dt @ p[f"{prefix}.dt_proj.weight"].T + p[f"{prefix}.dt_proj.bias"])
    A = -np.exp(p[f"{prefix}.A_log"])
    h, ys = np.zeros((d_inner, d_state)), []
    for t in range(len(x)):
        h = np.exp(delta[t][:, None] * A) * h + delta[t][:, None] * B[t][None, :] * u[t][:, None]
        ys.append(h @ C[t] + p[f"{prefix}.D"] * u[t])
    return (np.stack(ys) * silu(z)) @ p[f"{prefix}.out_proj.weight"].T


def mamba4rec_layer(p, prefix, x, d_state, num_layers):
    """Mamba4Rec's MambaLayer (eval): no residual around the Mamba block when num_layers == 1;
    FeedForward: LayerNorm(w_2 GELU(w_1 h) + h); LayerNorm eps 1e-12."""
    h = mamba_block(p, f"{prefix}.mamba", x, d_state)
    if num_layers > 1:
        h = h + x
    h = layer_norm(h, p[f"{prefix}.mamba_norm.weight"], p[f"{prefix}.mamba_norm.bias"], 1e-12)
    ffn = gelu(h @ p[f"{prefix}.ffn.0.weight"].T + p[f"{prefix}.ffn.0.bias"]) @ p[f"{prefix}.ffn.3.weight"].T + p[f"{prefix}.ffn.3.bias"]
    return layer_norm(ffn + h, p[f"{prefix}.ffn_norm.weight"], p[f"{prefix}.ffn_norm.bias"], 1e-12)


@pytest.mark.parametrize("num_layers", [1, 2])
def test_sequence_branch_matches_mamba4rec(num_layers):
    """Mamba4Rec.forward (eval): LayerNorm(item_emb) with eps 1e-12, then the MambaLayers, the output
    at the last step. The input is small (std 0.01), where eps 1e-12 and 1e-5 differ."""
    cfg = ModelConfig(embedding_dim=4, d_state=3, mamba_layers=num_layers, single_layer_residual=False, scan_backend="reference")
    branch = SequenceBranch(cfg).eval()
    p = hand_set(branch)
    x = np.random.default_rng(3).normal(size=(2, 5, 4)) * 0.01
    expected = []
    for sequence in x:
        h = layer_norm(sequence, p["input_norm.weight"], p["input_norm.bias"], 1e-12)
        for i in range(num_layers):
            h = mamba4rec_layer(p, f"layers.{i}", h, 3, num_layers)
        expected.append(h[-1])
    close(branch(torch.from_numpy(x), torch.ones(2, 5, dtype=torch.bool)), np.stack(expected))


def test_single_layer_residual_is_the_papers_default():
    """MDAF's reading keeps x in LayerNorm(x + Dropout(Mamba(x))) around its single layer."""
    cfg = ModelConfig(embedding_dim=4, d_state=3, scan_backend="reference")
    branch = SequenceBranch(cfg).eval()
    p = hand_set(branch)
    x = np.random.default_rng(4).normal(size=(1, 5, 4))
    h = layer_norm(x[0], p["input_norm.weight"], p["input_norm.bias"], 1e-12)
    # the two-layer equations with one layer are exactly "residual kept"
    close(branch(torch.from_numpy(x), torch.ones(1, 5, dtype=torch.bool)), mamba4rec_layer(p, "layers.0", h, 3, num_layers=2)[-1:])


def test_sequence_branch_initialisation_follows_mamba4rec():
    """_init_weights: every Linear (inside the Mamba block too) N(0, 0.02) with zero bias, so
    softplus(dt_proj.bias) = log 2 in every channel; A_log and D keep mamba_ssm's values."""
    torch.manual_seed(0)
    branch = SequenceBranch(ModelConfig(embedding_dim=64, d_state=32))
    linears = [(name, m) for name, m in branch.named_modules() if isinstance(m, nn.Linear)]
    assert {name.rsplit(".", 1)[-1] for name, _ in linears} >= {"in_proj", "x_proj", "dt_proj", "out_proj"}
    for name, linear in linears:
        assert linear.weight.mean().item() == pytest.approx(0, abs=0.02 * 4 / linear.weight.numel() ** 0.5), name
        assert linear.weight.std().item() == pytest.approx(0.02, rel=0.15 if linear.weight.numel() < 1000 else 0.03), name
        assert linear.bias is None or not linear.bias.any(), name
    mamba = branch.layers[0].mamba
    torch.testing.assert_close(torch.nn.functional.softplus(mamba.dt_proj.bias), torch.full((128,), np.log(2.0)))
    torch.testing.assert_close(mamba.A_log, torch.log(torch.arange(1.0, 33.0)).expand(128, 32))
    assert [m.eps for m in branch.modules() if isinstance(m, nn.LayerNorm)] == [1e-12] * 3


# --- DCNv2's mixture of low-rank experts (DeepCTR's CrossNetMix) -------------------------------


def test_dcnv2_cross_matches_crossnetmix_with_tanh_experts():
    cfg = ModelConfig(name="dcnv2", embedding_dim=2, num_cross_layers=2, cross_experts=3, cross_low_rank=2, mlp_hidden=[4])
    cross = build_model(cfg, {"user": 3, "item": 3, "category": 3}, embedding_backend="plain").cross
    p = hand_set(cross, scale=1.0)
    x0 = np.random.default_rng(5).normal(size=(4, 6))
    x = x0
    for layer in range(2):
        gates = softmax(np.stack([x @ p[f"gates.{i}.weight"][0] for i in range(3)], -1), axis=-1)
        experts = []
        for i in range(3):
            v = np.tanh(x @ p[f"V_kernels.{layer}"][i].T)
            v = np.tanh(v @ p[f"C_kernels.{layer}"][i].T)
            experts.append(x0 * (v @ p[f"U_kernels.{layer}"][i].T + p[f"bias.{layer}"][:, 0]))
        x = sum(gates[:, i : i + 1] * experts[i] for i in range(3)) + x
    close(cross(torch.from_numpy(x0)), x)


def test_dcnv2_gates_are_glorot_uniform():
    torch.manual_seed(0)
    cross = build_model(ModelConfig(name="dcnv2"), {"user": 3, "item": 3, "category": 3}, embedding_backend="plain").cross
    weights = torch.cat([gate.weight.flatten() for gate in cross.gates])
    bound = (6 / (192 + 1)) ** 0.5
    assert weights.abs().max() <= bound and weights.std().item() == pytest.approx(bound / 3**0.5, rel=0.1)


# --- AutoInt (Song et al. 2019, eqs. 5-8; DeepCTR-Torch's InteractingLayer) --------------------


def test_autoint_layer_matches_the_papers_equations():
    layer = InteractingLayer(4, num_heads=2)
    p = hand_set(layer)
    tokens = np.random.default_rng(6).normal(size=(2, 3, 4))
    heads = []
    for h in range(2):
        cols = slice(2 * h, 2 * h + 2)
        q, k, v = (tokens @ p[f"{name}.weight"][cols].T for name in ("query", "key", "value"))
        heads.append(softmax(q @ k.transpose(0, 2, 1), axis=-1) @ v)  # <W_Q e_m, W_K e_k>, unscaled
    expected = np.maximum(0, np.concatenate(heads, -1) + tokens @ p["residual.weight"].T)
    close(layer(torch.from_numpy(tokens)), expected)


def test_autoint_layer_parameters_and_initialisation():
    """W_Q, W_K, W_V, W_Res: 4 D^2, no biases, N(0, 0.05) as DeepCTR-Torch."""
    torch.manual_seed(0)
    layer = InteractingLayer(64, num_heads=2)
    assert sum(p.numel() for p in layer.parameters()) == 4 * 64 * 64
    weights = torch.cat([p.flatten() for p in layer.parameters()])
    assert weights.std().item() == pytest.approx(0.05, rel=0.02) and abs(weights.mean().item()) < 0.002


# --- BST (Chen et al. 2019, 3.2) ---------------------------------------------------------------


def test_bst_matches_its_transformer_layer_with_concatenated_positions():
    """E = [item embedding; position embedding]; S' = LN(S + MH(S)); F = LN(S' + LeakyReLU(S' W1 + b1) W2 + b2)
    with W1, W2 d x d; the output at the target step, [h; e_u; e_c] -> MLP -> logit (eval)."""
    cfg = ModelConfig(name="bst", embedding_dim=2, history_length=4, bst_blocks=1, bst_heads=2, mlp_hidden=[3])
    model = build_model(cfg, {"user": 3, "item": 6, "category": 11}, embedding_backend="plain").double().eval()
    p = hand_set(model)
    user, item, history = 2, 5, [1, 3, 4]
    batch = features(np.array([user]), np.array([item]), [history])  # category = item % 10 + 1
    emb = {t: p[f"embeddings.embeddings.{t}.weight"] for t in ("user", "item", "category")}
    steps = history + [item]
    recency = np.arange(len(steps))[::-1]  # 0 for the target, 1 for the newest click, ...
    x = np.concatenate([emb["item"][steps], p["positions.weight"][recency]], -1)  # [4, 4]
    qkv = x @ p["blocks.0.attention.in_proj_weight"].T + p["blocks.0.attention.in_proj_bias"]
    q, k, v = np.split(qkv, 3, -1)
    heads = [softmax(q[:, c] @ k[:, c].T / np.sqrt(2), -1) @ v[:, c] for c in (slice(0, 2), slice(2, 4))]
    attended = np.concatenate(heads, -1) @ p["blocks.0.attention.out_proj.weight"].T + p["blocks.0.attention.out_proj.bias"]
    s = layer_norm(x + attended, p["blocks.0.attention_norm.weight"], p["blocks.0.attention_norm.bias"], 1e-5)
    hidden = s @ p["blocks.0.ffn.0.weight"].T + p["blocks.0.ffn.0.bias"]
    ffn = np.where(hidden > 0, hidden, 0.01 * hidden) @ p["blocks.0.ffn.2.weight"].T + p["blocks.0.ffn.2.bias"]
    h = layer_norm(s + ffn, p["blocks.0.ffn_norm.weight"], p["blocks.0.ffn_norm.bias"], 1e-5)[-1]
    deep = [t for name, t in p.items() if name.startswith("deep.")]  # (weight, bias) pairs in order
    out = np.concatenate([h, emb["user"][user], emb["category"][item % 10 + 1]])
    out = np.maximum(0, out @ deep[0].T + deep[1])
    close(model(batch).logits, out @ deep[2].T + deep[3])


# --- weight decay (mamba_ssm's _no_weight_decay) -----------------------------------------------


def test_a_log_and_d_get_no_weight_decay():
    """One AdamW step on zero gradients is the decoupled decay alone: p <- p (1 - lr wd). A_log
    and D must not move; every other dense parameter shrinks by exactly that factor."""
    cfg = ModelConfig(embedding_dim=8, d_state=4, mlp_hidden=[8])
    model = build_model(cfg, {"user": 5, "item": 5, "category": 5}, embedding_backend="plain")
    optimizer = build_optimizer(model, TrainConfig(lr=0.1, weight_decay=0.5), "sgd")
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    optimizer.step()
    exempt = {name for name in before if name.endswith(("mamba.A_log", "mamba.D"))}
    assert exempt == {"sequence.layers.0.mamba.A_log", "sequence.layers.0.mamba.D"}
    for name, p in model.named_parameters():
        factor = 1.0 if name in exempt or name.startswith("embeddings.") else 1 - 0.1 * 0.5
        torch.testing.assert_close(p.detach(), before[name] * factor, msg=name)


# --- parameter counts beside the papers' formulas, and the new settings -----------------------


@pytest.mark.parametrize(
    "overrides, module, expected",
    [
        (["model.name=autoint"], "interacting layer x2", 4 * 64**2),
        (["model.name=bst"], "positions", 51 * 64),
        (["model.name=bst"], "transformer block x2", 4 * 128**2 + 4 * 128 + 2 * 128**2 + 2 * 128 + 4 * 128),
        (["model.static_branch=dcnv3_official"], "cross layer x4", 192 * 96 + 192 + 2 * 96),
        (["model.static_branch=dcnv3_official", "model.dcnv3_batch_norm=true"], "cross layer x4", 192 * 96 + 192 + 2 * 96 + 2),
    ],
)
def test_describe_shows_counts_beside_the_reference_formula(capsys, overrides, module, expected):
    numbers = describe_row(capsys, overrides, module)
    assert numbers[0] == numbers[-1] == expected


def describe_row(capsys, args, module):
    """The numbers on the line of `mdaf describe ARGS` that starts with `module`: ours, then the formula's."""
    assert mdaf_main(["describe", "--vocab", "user=4,item=4,category=4", *args]) == 0
    row = next(line for line in capsys.readouterr().out.splitlines() if line.startswith(module))
    return [int(word.replace(",", "")) for word in row[len(module):].split() if word.replace(",", "").isdigit()]


def test_gate_hidden_and_mamba_layers_are_settings_whose_defaults_keep_the_model():
    vocab = {"user": 5, "item": 5, "category": 5}
    default = build_model(ModelConfig(), vocab, embedding_backend="plain")
    assert [tuple(p.shape) for p in default.fusion.parameters()] == [(64, 128), (64,), (1, 64), (1,)]
    assert len(default.sequence.layers) == 1
    authors = build_model(ModelConfig(embedding_dim=32, gate_hidden=64, mamba_layers=2), vocab, embedding_backend="plain")
    assert [tuple(p.shape) for p in authors.fusion.parameters()] == [(64, 64), (64,), (1, 64), (1,)]
    assert len(authors.sequence.layers) == 2 and all(layer.residual for layer in authors.sequence.layers)


@pytest.mark.parametrize(
    "field, value, message",
    [
        ("mamba_layers", 0, r"^model.mamba_layers=0 must be at least 1$"),
        ("gate_hidden", -1, r"^model.gate_hidden=-1 must be 0 \(D\) or a width$"),
        ("bst_heads", 3, r"^model.bst_heads=3 does not divide the attention width 128$"),
    ],
)
def test_bad_settings_name_themselves(field, value, message):
    with pytest.raises(ConfigError, match=message):
        build_model(ModelConfig(name="bst", **{field: value}), {"user": 5, "item": 5, "category": 5}, embedding_backend="plain")


def test_authors_readme_config_builds_the_authors_variant():
    cfg = load_config(["configs/paper.yaml", "configs/authors_readme.yaml"], [])
    assert (cfg.loader.batch_size, cfg.train.lr, cfg.train.weight_decay) == (512, 0.0005, 0.00001)
    model = build_model(cfg.model, {"user": 5, "item": 5, "category": 5}, embedding_backend="plain")
    assert model.embeddings.embeddings["item"].weight.shape[1] == 32
    assert model.static.lcn._num_layers == len(model.static.ecn.layers) == 3
    assert len(model.sequence.layers) == 2 and model.fusion.mlp[0].out_features == 64


def test_authors_readme_table2_deltas_follow_from_its_aucs():
    """The README's "Improvement vs BST" column is its Val AUCs' difference, in basis points."""
    rows = AUTHORS_README_TABLE2.rows
    reference = rows[AUTHORS_README_TABLE2.reference].auc
    for label, row in rows.items():
        assert row.test_auc is not None and row.test_auc < row.auc, label
        if label != AUTHORS_README_TABLE2.reference:
            assert row.delta_bp == round((row.auc - reference) * 1e4), label
