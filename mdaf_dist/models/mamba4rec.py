"""Mamba4Rec (Liu et al. 2024): MDAF's sequential branch and, with the target item appended to the
sequence, the sequence-only baseline of Tables 2 and 3. Layers, their LayerNorm eps and the
initialisation follow Mamba4Rec's code (MambaLayer, FeedForward, _init_weights)."""

from __future__ import annotations

import torch
from torch import nn
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from mdaf_dist.config import ModelConfig
from mdaf_dist.models.dropout import HashDropout
from mdaf_dist.models.embeddings import EmbeddedFeatures, embed
from mdaf_dist.models.mamba import Mamba
from mdaf_dist.models.output import ModelOutput, prediction_head


# Mamba4Rec's LayerNorm eps (its layers and its input norm)
LAYER_NORM_EPS = 1e-12


@torch.no_grad()
def mamba4rec_init(module: nn.Module) -> None:
    """Mamba4Rec's `_init_weights`, applied to every submodule: each Linear, those inside the
    Mamba block included, gets weights N(0, 0.02) and a zero bias (dt_proj's too: softplus(0) =
    0.693 in every channel); LayerNorms weight 1, bias 0. The conv1d, A_log and D keep the Mamba
    block's own initialisation."""
    if isinstance(module, nn.Linear):
        module.weight.normal_(mean=0.0, std=0.02)
        if module.bias is not None:
            module.bias.zero_()
    elif isinstance(module, nn.LayerNorm):
        module.weight.fill_(1.0)
        module.bias.zero_()


class Mamba4RecLayer(nn.Module):
    """Mamba4Rec's MambaLayer: one Mamba block and a position-wise FFN (D -> 4D -> D, GELU), each
    wrapped as LayerNorm(x + Dropout(f(x))) with eps 1e-12.

    `residual=False` is Mamba4Rec's own single-layer case: LayerNorm(Dropout(Mamba(x))), without
    the x. MDAF's paper describes one Mamba layer and gives no reason to drop the residual, so
    MDAF keeps it by default (`model.single_layer_residual`); stacked layers always have it."""

    def __init__(self, dim: int, d_state: int, d_conv: int, expand: int, dropout: float, scan_backend: str,
                 residual: bool = True):
        super().__init__()
        self.residual = residual
        self.mamba = Mamba(dim, d_state=d_state, d_conv=d_conv, expand=expand, scan_backend=scan_backend)
        self.mamba_norm = nn.LayerNorm(dim, eps=LAYER_NORM_EPS)
        self.ffn = nn.Sequential(nn.Linear(dim, 4 * dim), nn.GELU(), nn.Dropout(dropout), nn.Linear(4 * dim, dim))
        self.ffn_norm = nn.LayerNorm(dim, eps=LAYER_NORM_EPS)
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor, mask: torch.Tensor, last_only: bool = False) -> torch.Tensor:
        """[B, L, D] -> [B, L, D], or with last_only the last step's [B, D]: everything after the
        Mamba block is position-wise, so the other steps need not be computed at all."""
        mamba = self.dropout(self.mamba(x, mask, last_only=last_only))
        if self.residual:
            mamba = mamba + (x[:, -1] if last_only else x)
        x = self.mamba_norm(mamba)
        return self.ffn_norm(x + self.dropout(self.ffn(x)))


class SequenceBranch(nn.Module):
    """H = LayerNorm(Dropout(E_v[hist])) -> `mamba_layers` Mamba4Rec layers -> h_seq = output at the
    last real step, initialised as Mamba4Rec initialises its layers (`mamba4rec_init`).

    Sequences are right-aligned, so the last real step is position L - 1 for every sample.
    An empty history (possible only when the empty-history filter is off; the paper drops those
    samples, 5.1.1 step 3) has no real step: its h_seq is set to zero, "no sequential evidence",
    rather than the meaningless output at a padded step."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        dim = cfg.embedding_dim
        self.input_dropout = HashDropout(cfg.dropout)  # the one dropout over [B, L, D]: the cheaper mask
        self.input_norm = nn.LayerNorm(dim, eps=LAYER_NORM_EPS)
        residual = cfg.single_layer_residual or cfg.mamba_layers > 1
        self.layers = nn.ModuleList(
            Mamba4RecLayer(dim, cfg.d_state, cfg.d_conv, cfg.expand, cfg.dropout, cfg.scan_backend, residual)
            for _ in range(cfg.mamba_layers)
        )
        self.apply(mamba4rec_init)

    def forward(self, sequence: torch.Tensor, mask: torch.Tensor, all_steps: bool = False) -> torch.Tensor:
        """h_seq [B, D], or with all_steps the output at every step [B, L, D], zero on padding
        (what a token-level fusion reads)."""
        out = self.input_norm(self.input_dropout(sequence))
        for layer in self.layers[:-1]:
            out = layer(out, mask)
        if all_steps:
            return self.layers[-1](out, mask) * mask.unsqueeze(-1).to(out.dtype)
        out = self.layers[-1](out, mask, last_only=True)
        return out * mask[:, -1:].to(out.dtype)


class Mamba4Rec(nn.Module):
    """Sequence-only CTR model: the target item is appended as the newest step, so the output at
    that step has read the whole history and knows which item is scored; head D -> D -> 1.
    Without the target the model could not tell a clicked item from a sampled negative of the same
    user and moment. It is also MDAF's "sequence only" ablation: the paper reports the same AUC
    (0.5716) for both in Tables 2 and 3. The baseline's config drops the residual around the
    single layer as Mamba4Rec does; the ablation keeps MDAF's branch as it is."""

    def __init__(self, cfg: ModelConfig, embeddings: nn.Module):
        super().__init__()
        self.embeddings = embeddings
        self.history_length = cfg.history_length
        self.sequence = SequenceBranch(cfg)
        self.dropout = nn.Dropout(cfg.dropout)
        self.head = prediction_head(cfg.embedding_dim, cfg.embedding_dim)

    def forward(self, features: KeyedJaggedTensor) -> ModelOutput:
        return self.from_embeddings(embed(self.embeddings, features, self.history_length))

    def from_embeddings(self, e: EmbeddedFeatures) -> ModelOutput:
        """Everything after the table lookup (what a served model runs on looked-up rows)."""
        sequence, mask = e.history_with_target()  # [B, L + 1, D], [B, L + 1]
        h_seq = self.sequence(sequence, mask)
        return ModelOutput(logits=self.head(self.dropout(h_seq)).squeeze(-1), h_seq=h_seq)
