"""Encoder self-attention in the reduced dimension of low-rank q, k and v ("work in reduced dimensionality", LiteASR).

With q1 = x Wq1, k1 = x Wk1, v1 = x Wv1 shared by all heads, and A_h, B_h head h's columns of Wq2 and Wk2, head h
scores
    Q_h K_h^T = q1 (A_h B_h^T) k1^T + (bq_h B_h^T) k1^T + (terms constant along a query row).
The constant terms cancel in softmax, so each head attends with kk-wide queries q1 W_m,h + bq_h B_h^T
(W_m,h = A_h B_h^T, kq x kk) against the shared k1, over the shared v1; its columns of Wv2 apply after, and the v
bias once (attention rows sum to 1). Per head the L^2 work drops from the head dim to the ranks.

The one non-obvious choice: v must be low-rank too. PyTorch's fused attention kernels need queries, keys and values
of one width and otherwise fall back to an unfused kernel several times slower (measured on CPU), so keys and values are
zero-padded to a common width max(kk, kv), and with a full-width v that width is the head dim: no gain left.
Hence the rule in `supports_low_rank_attention`: q, k and v low-rank with ranks below the head dim.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F
from transformers.models.whisper.modeling_whisper import WhisperAttention, WhisperEncoderLayer

from liteasr.remote_code.modeling_lite_whisper import LowRankLinear

__all__ = ["LowRankSelfAttention", "supports_low_rank_attention", "use_low_rank_attention"]


def supports_low_rank_attention(attention: WhisperAttention) -> bool:
    """Whether q, k and v are low-rank with ranks below the head dim, where the reduced path is cheaper."""
    return all(
        isinstance(proj, LowRankLinear) and proj.rank < attention.head_dim
        for proj in (attention.q_proj, attention.k_proj, attention.v_proj)
    )


def use_low_rank_attention(model: nn.Module) -> int:
    """Swap `LowRankSelfAttention` into every encoder layer of `model` that supports it; returns how many.

    The projections are kept as they are, so parameter names and the state dict do not change.
    """
    swapped = 0
    for layer in model.modules():
        if (
            isinstance(layer, WhisperEncoderLayer)
            and not isinstance(layer.self_attn, LowRankSelfAttention)
            and supports_low_rank_attention(layer.self_attn)
        ):
            layer.self_attn = LowRankSelfAttention(layer.self_attn)
            swapped += 1
    return swapped


class LowRankSelfAttention(WhisperAttention):
    """Drop-in for an encoder layer's `WhisperAttention` whose q, k and v projections are low-rank.

    A `WhisperAttention` subclass so that transformers still records its weights for `output_attentions`; the
    weights returned are the dense path's attention probabilities (equal up to rounding).
    """

    def __init__(self, attention: WhisperAttention) -> None:
        if attention.is_decoder or not supports_low_rank_attention(attention):
            raise ValueError(
                "LowRankSelfAttention needs encoder self-attention with low-rank q, k and v of rank below the "
                f"head dim {attention.head_dim}; got q_proj={attention.q_proj}, k_proj={attention.k_proj}, "
                f"v_proj={attention.v_proj}"
            )
        # The parent builds dense projections that are replaced right below: on meta they cost nothing.
        with torch.device("meta"):
            super().__init__(
                embed_dim=attention.embed_dim,
                num_heads=attention.num_heads,
                dropout=attention.dropout,
                layer_idx=attention.layer_idx,
                config=attention.config,
            )
        self.q_proj, self.k_proj = attention.q_proj, attention.k_proj
        self.v_proj, self.out_proj = attention.v_proj, attention.out_proj
        self.train(attention.training)
        # Keys and values share one width for the fused kernels; the narrower is zero-padded (see module doc).
        self.width = max(self.k_proj.rank, self.v_proj.rank)
        self._score_cache: tuple[torch.Tensor, torch.Tensor] | None = None
        self._score_cache_key: tuple | None = None

    def forward(
        self,
        hidden_states: torch.Tensor,
        key_value_states: torch.Tensor | None = None,
        past_key_values: object | None = None,
        attention_mask: torch.Tensor | None = None,
        output_attentions: bool = False,
        **kwargs: object,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Same call and result as `WhisperAttention.forward` for encoder self-attention.

        `attention_mask` is additive and broadcasts to (batch, heads, L, L); extra transformers kwargs are ignored.
        """
        if key_value_states is not None or past_key_values is not None:
            raise ValueError("LowRankSelfAttention is encoder self-attention: no key_value_states or cache")
        batch, length, _ = hidden_states.shape
        w_m, query_bias = self._score_factors()
        # (batch, heads, L, width) queries; keys and values (batch, 1, L, width) are shared by the heads.
        queries = torch.einsum("blq,hqk->bhlk", hidden_states @ self.q_proj.weight1, w_m) + query_bias
        keys = F.pad(hidden_states @ self.k_proj.weight1, (0, self.width - self.k_proj.rank)).unsqueeze(1)
        values = F.pad(hidden_states @ self.v_proj.weight1, (0, self.width - self.v_proj.rank)).unsqueeze(1)
        keys = keys.expand(-1, self.num_heads, -1, -1)
        values = values.expand(-1, self.num_heads, -1, -1)

        dropout = self.dropout if self.training else 0.0
        weights = None
        if output_attentions:
            scores = queries @ keys.transpose(-1, -2)
            if attention_mask is not None:
                scores = scores + attention_mask
            weights = F.softmax(scores, dim=-1, dtype=torch.float32).to(queries.dtype)
            context = F.dropout(weights, p=dropout, training=self.training) @ values
        else:
            context = F.scaled_dot_product_attention(
                queries, keys, values, attn_mask=attention_mask, dropout_p=dropout, scale=1.0
            )

        # Each head maps the shared kv-wide context through its own columns of Wv2.
        v2 = self.v_proj.weight2.view(self.v_proj.rank, self.num_heads, self.head_dim)
        output = torch.einsum("bhlv,vhd->blhd", context[..., : self.v_proj.rank], v2)
        return self.out_proj(output.reshape(batch, length, -1) + self.v_proj.bias), weights

    def _score_factors(self) -> tuple[torch.Tensor, torch.Tensor]:
        """W_m (heads, kq, width) and the query-bias row bq_h B_h^T (heads, 1, width), times the softmax scaling.

        Cached while the tensors they come from keep their storage, version (in-place writes bump it), dtype and
        device; recomputed on every call when autograd needs them, so training sees fresh gradients.
        """
        sources = (self.q_proj.weight2, self.q_proj.bias, self.k_proj.weight2)
        if torch.is_grad_enabled() and any(t.requires_grad for t in sources):
            return self._compute_score_factors()
        key = tuple(
            # Inference tensors keep no version counter; they cannot be written outside inference mode.
            (t.data_ptr(), 0 if t.is_inference() else t._version, t.dtype, t.device)
            for t in sources
        )
        if key != self._score_cache_key:
            self._score_cache = self._compute_score_factors()
            self._score_cache_key = key
        return self._score_cache

    def _compute_score_factors(self) -> tuple[torch.Tensor, torch.Tensor]:
        # Products summed over the head dim: in float32 at least, then back to the weights' dtype.
        heads, head_dim, dtype = self.num_heads, self.head_dim, self.q_proj.weight2.dtype
        compute = torch.promote_types(dtype, torch.float32)
        a = self.q_proj.weight2.to(compute).view(self.q_proj.rank, heads, head_dim)  # A_h = a[:, h]
        b = self.k_proj.weight2.to(compute).view(self.k_proj.rank, heads, head_dim)  # B_h = b[:, h]
        b = F.pad(b, (0, 0, 0, 0, 0, self.width - self.k_proj.rank))  # zero rows meet the keys' zero padding
        bq = self.q_proj.bias.to(compute).view(heads, 1, head_dim)
        w_m = torch.einsum("qhd,khd->hqk", a, b) * self.scaling
        query_bias = torch.einsum("hod,khd->hok", bq, b) * self.scaling
        return w_m.to(dtype), query_bias.to(dtype)
