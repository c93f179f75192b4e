"""The decoder's per-row state in preallocated buffers, and one batched decoder forward over any rows.

Each row (one window being decoded) owns a slot: its cross-attention keys and values, computed once from the
encoder output when the window is admitted, and its self-attention keys and values, written one position per step.
A decode step runs the decoder layers of the transformers Whisper model (their own modules, so int8-quantized linear
maps work unchanged) over rows `0..n-1`: active rows are kept contiguous at the front, so a step reads the buffers
as views and never copies encoder states. A row that leaves frees its slot by having the last row moved into it
(`move`), a copy of one row paid once instead of a gather paid at every step. Each layer's self-attention q/k/v
run as one fused linear map (`modeling.fuse_linears`): at a few rows a call costs more than its arithmetic.

Rows attend over the positions written so far (`0..end`, a boolean mask hides each row's unwritten tail), so rows of
different lengths share a step. On CUDA the one-token step over the first `n` rows is captured as a CUDA graph per
batch-size bucket (`CudaGraphSteps`), with the self-attention span fixed at the buffer length.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

from liteasr.modeling import fuse_linears

__all__ = ["CudaGraphSteps", "DecoderSlots"]


class DecoderSlots:
    """Self- and cross-attention buffers for `capacity` rows of one Whisper decoder."""

    def __init__(self, model, capacity: int) -> None:
        if capacity < 1:
            raise ValueError(f"capacity must be at least 1, got {capacity}")
        decoder = model.model.decoder
        config = model.config
        embedding = decoder.embed_tokens.weight  # the decoder's own dtype (the encoder's may differ)
        self.device, self.dtype = embedding.device, embedding.dtype
        self.decoder = decoder
        self.proj_out = model.proj_out
        self.self_qkv = [
            fuse_linears([layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj])
            for layer in decoder.layers
        ]
        self.capacity = capacity
        self.heads = config.decoder_attention_heads
        self.head_dim = config.d_model // self.heads
        self.frames = config.max_source_positions
        self.max_positions = config.max_target_positions
        layers = len(decoder.layers)
        self_shape = (layers, capacity, self.heads, self.max_positions, self.head_dim)
        cross_shape = (layers, capacity, self.heads, self.frames, self.head_dim)
        # Zeros, not garbage: a row's masked tail still enters the attention product (weight 0), and 0 * NaN is NaN.
        self.self_k = torch.zeros(self_shape, device=self.device, dtype=self.dtype)
        self.self_v = torch.zeros(self_shape, device=self.device, dtype=self.dtype)
        # Always written whole before they are read; torch.empty leaves unused slots' pages untouched.
        self.cross_k = torch.empty(cross_shape, device=self.device, dtype=self.dtype)
        self.cross_v = torch.empty(cross_shape, device=self.device, dtype=self.dtype)

    def write_cross(self, rows: slice, encoded: torch.Tensor) -> None:
        """Cross-attention keys and values of `encoded` [n, frames, d_model] into the slots `rows`."""
        n = encoded.shape[0]
        if encoded.shape[1] != self.frames:
            raise ValueError(f"expected encoder states of {self.frames} frames, got {encoded.shape[1]}")
        for index, layer in enumerate(self.decoder.layers):
            attention = layer.encoder_attn
            shape = (n, self.frames, self.heads, self.head_dim)
            self.cross_k[index, rows] = attention.k_proj(encoded).view(shape).transpose(1, 2)
            self.cross_v[index, rows] = attention.v_proj(encoded).view(shape).transpose(1, 2)

    def move(self, source: int, target: int, length: int) -> None:
        """Copy the row in slot `source` (its first `length` positions) into slot `target`."""
        self.cross_k[:, target] = self.cross_k[:, source]
        self.cross_v[:, target] = self.cross_v[:, source]
        self.self_k[:, target, :, :length] = self.self_k[:, source, :, :length]
        self.self_v[:, target, :, :length] = self.self_v[:, source, :, :length]

    def forward(
        self,
        rows: slice | torch.Tensor,
        tokens: torch.Tensor,
        start: torch.Tensor,
        *,
        span: int | None = None,
    ) -> torch.Tensor:
        """Decoder hidden states [n, T, d_model] (after the final layer norm) of `tokens` [n, T] at positions
        `start[i] .. start[i] + T - 1`, writing their self-attention keys and values into the slots.

        `rows`: a slice of consecutive slots (views, the fast path), or slot indices (gathered copies: for retrying
        rows one by one after a failed step). `span`: positions attended over; default: just enough for every row.
        """
        return self._run(rows, tokens, start, span, None)

    def cross_scores(
        self, slot: int, tokens: torch.Tensor, heads: Sequence[tuple[int, int]]
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """One row's `tokens` [T] from position 0: (cross-attention scores [len(heads), T, frames] of the given
        (layer, head) pairs, before the softmax; hidden states [T, d_model]). For word timestamps: the alignment
        heads attend to the audio frames each token was heard in."""
        scores: dict[int, torch.Tensor] = dict.fromkeys({layer for layer, _ in heads})
        start = torch.zeros(1, dtype=torch.long, device=tokens.device)
        hidden = self._run(slice(slot, slot + 1), tokens[None], start, None, scores)
        return torch.stack([scores[layer][0, head] for layer, head in heads]), hidden[0]

    def _run(
        self,
        rows: slice | torch.Tensor,
        tokens: torch.Tensor,
        start: torch.Tensor,
        span: int | None,
        capture: dict[int, torch.Tensor | None] | None,
    ) -> torch.Tensor:
        """`forward`; the cross-attention scores [n, heads, T, frames] of the layers in `capture` go into it."""
        n, length = tokens.shape
        decoder = self.decoder
        positions = start[:, None] + torch.arange(length, device=tokens.device)  # [n, T]
        if span is None:
            span = int(start.max()) + length
        slot_index = (
            torch.arange(rows.start, rows.stop, device=tokens.device) if isinstance(rows, slice) else rows
        )
        hidden = decoder.embed_tokens(tokens) + decoder.embed_positions.weight[positions]
        # [n, 1, T, span]: a query sees its own position and the ones before it.
        visible = (torch.arange(span, device=tokens.device) <= positions[:, :, None])[:, None]
        heads, head_dim = self.heads, self.head_dim
        for index, layer in enumerate(decoder.layers):
            attention = layer.self_attn
            x = layer.self_attn_layer_norm(hidden)
            q, k, v = self.self_qkv[index](x).view(n, length, 3, heads, head_dim).unbind(2)
            q = (q * attention.scaling).transpose(1, 2)
            # Advanced indices around a slice put their dimensions first: the value is [n, T, heads, head_dim].
            self.self_k[index][slot_index[:, None], :, positions] = k
            self.self_v[index][slot_index[:, None], :, positions] = v
            keys = self.self_k[index][rows, :, :span]
            values = self.self_v[index][rows, :, :span]
            out = F.scaled_dot_product_attention(q, keys, values, attn_mask=visible, scale=1.0)
            hidden = hidden + attention.out_proj(out.transpose(1, 2).reshape(n, length, -1))

            attention = layer.encoder_attn
            x = layer.encoder_attn_layer_norm(hidden)
            q = (attention.q_proj(x) * attention.scaling).view(n, length, heads, head_dim).transpose(1, 2)
            out = F.scaled_dot_product_attention(
                q, self.cross_k[index][rows], self.cross_v[index][rows], scale=1.0
            )
            if capture is not None and index in capture:
                capture[index] = (q @ self.cross_k[index][rows].transpose(-1, -2)).float()
            hidden = hidden + attention.out_proj(out.transpose(1, 2).reshape(n, length, -1))

            x = layer.final_layer_norm(hidden)
            hidden = hidden + layer.fc2(layer.activation_fn(layer.fc1(x)))
        return decoder.layer_norm(hidden)

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.proj_out(hidden)


class CudaGraphSteps:
    """The one-token decode step over rows `0..n-1`, captured as a CUDA graph per batch-size bucket.

    Inputs live in static tensors; a step over `n` rows copies its tokens and positions into the bucket of the
    smallest captured size >= n and replays it. Padding rows decode whatever their slots hold; their outputs are
    ignored. The self-attention span is the whole buffer (a graph cannot change shapes), masked per row.
    """

    def __init__(self, slots: DecoderSlots, buckets: tuple[int, ...] = (1, 2, 4, 8, 16, 32, 64)) -> None:
        if slots.device.type != "cuda":
            raise ValueError("CUDA graphs need a CUDA device")
        self.slots = slots
        self.buckets = tuple(b for b in buckets if b <= slots.capacity) or (slots.capacity,)
        if self.buckets[-1] < slots.capacity:
            self.buckets += (slots.capacity,)
        self._graphs: dict[int, tuple[torch.cuda.CUDAGraph, torch.Tensor, torch.Tensor, torch.Tensor]] = {}
        self._pool = None

    @torch.inference_mode()
    def capture(self) -> None:
        """Record one graph per bucket (largest first, so smaller ones reuse its memory pool)."""
        slots = self.slots
        for size in sorted(self.buckets, reverse=True):
            tokens = torch.zeros((size, 1), dtype=torch.long, device=slots.device)
            start = torch.zeros(size, dtype=torch.long, device=slots.device)
            stream = torch.cuda.Stream(slots.device)
            stream.wait_stream(torch.cuda.current_stream(slots.device))
            with torch.cuda.stream(stream):  # warm-up outside the graph (lazy init, autotuning)
                for _ in range(2):
                    self._run(size, tokens, start)
            torch.cuda.current_stream(slots.device).wait_stream(stream)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=self._pool):
                logits = self._run(size, tokens, start)
            if self._pool is None:
                self._pool = graph.pool()
            self._graphs[size] = (graph, tokens, start, logits)
        torch.cuda.synchronize(slots.device)

    def _run(self, size: int, tokens: torch.Tensor, start: torch.Tensor) -> torch.Tensor:
        hidden = self.slots.forward(slice(0, size), tokens, start, span=self.slots.max_positions)
        return self.slots.logits(hidden[:, -1])

    def step(self, tokens: torch.Tensor, start: torch.Tensor) -> torch.Tensor:
        """Logits [n, vocab] of the one-token step of rows `0..n-1` (`tokens` [n, 1], `start` [n])."""
        n = tokens.shape[0]
        size = next(b for b in self.buckets if b >= n)
        graph, static_tokens, static_start, logits = self._graphs[size]
        static_tokens[:n].copy_(tokens)
        static_start[:n].copy_(start)
        if n < size:  # padding rows: a valid position, whatever they compute is dropped
            static_start[n:].zero_()
        graph.replay()
        return logits[:n]
