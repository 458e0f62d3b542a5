"""A Llama-shaped decoder using Hugging Face ``LlamaForCausalLM`` parameter names.

Every parameter is a plain ``nn.Linear``/``nn.Embedding``/``RMSNorm`` weight, so the model builds
on the ``meta`` device in well under a second even at 7B size::

    with torch.device("meta"):
        model = llama_7b()   # 291 parameters, no memory for weights

A model with ``L`` layers has ``9 * L + 3`` named parameters (``9 * L + 2`` when
``tie_embeddings=True``, since ``named_parameters()`` yields a shared tensor once).
Rotary position embeddings are omitted: the forward pass only needs to run.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from torch.nn import functional as F


def _default_heads(hidden: int) -> int:
    """Pick a head count: the largest common head size (128, 64, ...) giving >= 2 heads."""
    for head_dim in (128, 64, 32, 16, 8):
        if hidden % head_dim == 0 and hidden // head_dim >= 2:
            return hidden // head_dim
    return 1


class RMSNorm(nn.Module):
    """Root-mean-square layer norm with a single ``weight`` parameter (initialised to ones)."""

    def __init__(self, hidden: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Normalise the last dimension of ``x`` by its RMS and scale by ``weight``."""
        variance = x.float().pow(2).mean(-1, keepdim=True)
        return (x.float() * torch.rsqrt(variance + self.eps)).to(x.dtype) * self.weight


class LlamaAttention(nn.Module):
    """Causal multi-head self-attention: ``q_proj``, ``k_proj``, ``v_proj``, ``o_proj``.

    ``kv_heads`` < ``heads`` gives grouped-query attention (Llama-2-70B): ``k_proj`` and
    ``v_proj`` then map to ``kv_heads * head_dim`` features.
    """

    def __init__(self, hidden: int, heads: int, kv_heads: int | None = None) -> None:
        super().__init__()
        kv_heads = kv_heads or heads
        if hidden % heads or heads % kv_heads:
            raise ValueError(f"hidden ({hidden}) must be divisible by heads ({heads}), "
                             f"and heads by kv_heads ({kv_heads})")
        self.heads = heads
        self.kv_heads = kv_heads
        kv_dim = hidden // heads * kv_heads
        self.q_proj = nn.Linear(hidden, hidden, bias=False)
        self.k_proj = nn.Linear(hidden, kv_dim, bias=False)
        self.v_proj = nn.Linear(hidden, kv_dim, bias=False)
        self.o_proj = nn.Linear(hidden, hidden, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Attend over ``(batch, seq, hidden)`` and return the same shape."""
        b, s, d = x.shape

        def split(t: torch.Tensor, heads: int) -> torch.Tensor:
            return t.view(b, s, heads, d // self.heads).transpose(1, 2)

        q = split(self.q_proj(x), self.heads)
        k = split(self.k_proj(x), self.kv_heads)
        v = split(self.v_proj(x), self.kv_heads)
        if self.kv_heads != self.heads:
            k = k.repeat_interleave(self.heads // self.kv_heads, dim=1)
            v = v.repeat_interleave(self.heads // self.kv_heads, dim=1)
        out = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.o_proj(out.transpose(1, 2).reshape(b, s, d))


class LlamaMLP(nn.Module):
    """SwiGLU feed-forward: ``down_proj(silu(gate_proj(x)) * up_proj(x))``."""

    def __init__(self, hidden: int, intermediate: int) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(hidden, intermediate, bias=False)
        self.up_proj = nn.Linear(hidden, intermediate, bias=False)
        self.down_proj = nn.Linear(intermediate, hidden, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Apply the gated feed-forward network position-wise."""
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class LlamaDecoderLayer(nn.Module):
    """Pre-norm decoder layer: ``input_layernorm``, ``self_attn``, ``post_attention_layernorm``,
    ``mlp``."""

    def __init__(self, hidden: int, intermediate: int, heads: int,
                 kv_heads: int | None = None) -> None:
        super().__init__()
        self.self_attn = LlamaAttention(hidden, heads, kv_heads)
        self.mlp = LlamaMLP(hidden, intermediate)
        self.input_layernorm = RMSNorm(hidden)
        self.post_attention_layernorm = RMSNorm(hidden)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Apply the layer to ``(batch, seq, hidden)`` hidden states."""
        x = x + self.self_attn(self.input_layernorm(x))
        return x + self.mlp(self.post_attention_layernorm(x))


class LlamaModel(nn.Module):
    """The decoder stack: ``embed_tokens``, ``layers.{i}``, ``norm``."""

    def __init__(self, hidden: int, intermediate: int, layers: int, vocab: int, heads: int,
                 kv_heads: int | None = None) -> None:
        super().__init__()
        self.embed_tokens = nn.Embedding(vocab, hidden)
        self.layers = nn.ModuleList(
            LlamaDecoderLayer(hidden, intermediate, heads, kv_heads) for _ in range(layers)
        )
        self.norm = RMSNorm(hidden)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        """Map ``(batch, seq)`` token ids to final normalised hidden states."""
        x = self.embed_tokens(tokens)
        for layer in self.layers:
            x = layer(x)
        return self.norm(x)


class Llama(nn.Module):
    """Llama-shaped causal language model (``model.*`` plus ``lm_head``), all Linear bias-free.

    Parameter names, in order: ``model.embed_tokens.weight``; per layer ``i``
    ``model.layers.{i}.self_attn.{q,k,v,o}_proj.weight``,
    ``model.layers.{i}.mlp.{gate,up,down}_proj.weight``,
    ``model.layers.{i}.input_layernorm.weight``,
    ``model.layers.{i}.post_attention_layernorm.weight``; then ``model.norm.weight`` and
    ``lm_head.weight`` (the same tensor as ``model.embed_tokens.weight`` when
    ``tie_embeddings=True``). ``heads`` defaults to a head size of 128 where possible;
    ``kv_heads`` (default: ``heads``) below it gives grouped-query attention.
    """

    def __init__(
        self,
        hidden: int = 64,
        intermediate: int = 172,
        layers: int = 2,
        vocab: int = 128,
        tie_embeddings: bool = False,
        heads: int | None = None,
        kv_heads: int | None = None,
    ) -> None:
        super().__init__()
        self.model = LlamaModel(
            hidden, intermediate, layers, vocab, heads if heads else _default_heads(hidden),
            kv_heads,
        )
        self.lm_head = nn.Linear(hidden, vocab, bias=False)
        if tie_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        """Map a ``(batch, seq)`` LongTensor of token ids to ``(batch, seq, vocab)`` logits."""
        return self.lm_head(self.model(tokens))


def llama_7b(**kw: Any) -> Llama:
    """Llama-7B shapes (32 layers, 291 parameters, ~6.7B numel); build it on ``meta``."""
    return Llama(hidden=4096, intermediate=11008, layers=32, vocab=32000, **kw)


def llama_70b(**kw: Any) -> Llama:
    """Llama-2-70B shapes (80 layers, 64 heads, 8 key/value heads, 723 parameters, ~69.0B
    numel); build it on ``meta``."""
    return Llama(hidden=8192, intermediate=28672, layers=80, vocab=32000, heads=64,
                 kv_heads=8, **kw)


def llama_2_5g(**kw: Any) -> Llama:
    """Llama shapes whose bf16 checkpoint is about 2.5 GiB (24 layers, 219 parameters)."""
    return Llama(hidden=2048, intermediate=5504, layers=24, vocab=32000, **kw)
