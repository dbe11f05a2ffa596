"""A Llama-family decoder in plain torch: Llama 2/3/3.1, Mistral, Qwen2, SmolLM2.

The forward pass is split at attention so that the engine can run its own (paged, sparse)
attention between the pieces::

    h = model.embed(token_ids)                                  # [T, hidden]
    for layer in range(model.config.num_layers):
        q, k, v = model.attention_inputs(layer, h, positions)   # [T, Hq, D], [T, Hkv, D] x2
        attn = <any attention over the sequence's KV>           # [T, Hq, D]
        h = model.attention_output(layer, h, attn)              # [T, hidden]
    logits = model.logits(h)                                    # [T, vocab] float32

Every piece is per token: the T rows may belong to different sequences (positions per row).
Weights mirror Hugging Face names, except that q/k/v and gate/up are fused (``qkv_proj``,
``gate_up_proj``). Numerics follow ``transformers``: RMSNorm and RoPE in float32.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, cast

import torch
import torch.nn.functional as F
from torch import nn

logger = logging.getLogger(__name__)

SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2")
_MIN_ROPE_TABLE = 4096


class CheckpointError(ValueError):
    """A checkpoint or its config cannot be used; the message says what to fix."""


@dataclass(frozen=True)
class RopeScaling:
    """RoPE frequency scaling, from HF ``rope_scaling`` / ``rope_parameters``."""

    rope_type: str
    """``"linear"`` (all frequencies divided by ``factor``) or ``"llama3"`` (Llama 3.1)."""
    factor: float
    """Context extension factor (8 for Llama 3.1)."""
    low_freq_factor: float = 1.0
    """llama3: wavelengths above ``original / low_freq_factor`` are divided by ``factor``."""
    high_freq_factor: float = 4.0
    """llama3: wavelengths below ``original / high_freq_factor`` are kept."""
    original_max_position_embeddings: int = 8192
    """llama3: the pre-training context length."""


@dataclass(frozen=True)
class ModelConfig:
    """Architecture of a Llama-family decoder."""

    model_type: str
    """HF ``model_type``: one of ``SUPPORTED_MODEL_TYPES``."""
    vocab_size: int
    """Rows of the embedding and of the LM head (may exceed the tokenizer's vocabulary)."""
    hidden_size: int
    """Width of the residual stream."""
    intermediate_size: int
    """Width of the SwiGLU MLP."""
    num_layers: int
    """Number of decoder layers."""
    num_heads: int
    """Query heads (Hq)."""
    num_kv_heads: int
    """Key/value heads (Hkv); ``num_heads % num_kv_heads == 0`` (GQA)."""
    head_dim: int
    """Per-head width (D); HF default ``hidden_size // num_heads``."""
    rms_norm_eps: float
    """Epsilon of every RMSNorm."""
    rope_theta: float
    """RoPE base."""
    rope_scaling: RopeScaling | None
    """RoPE frequency scaling, or None for plain RoPE."""
    max_position_embeddings: int
    """Trained context length (positions beyond still work, without guarantees)."""
    qkv_bias: bool
    """q/k/v projections have a bias (Qwen2; Llama with ``attention_bias``)."""
    o_bias: bool
    """The output projection has a bias (Llama with ``attention_bias``)."""
    mlp_bias: bool
    """The MLP projections have biases (Llama with ``mlp_bias``)."""
    tie_word_embeddings: bool
    """The LM head reuses the embedding matrix."""

    @property
    def sm_scale(self) -> float:
        """Softmax scale of attention: ``head_dim ** -0.5``."""
        return self.head_dim**-0.5

    @classmethod
    def from_hf_config(cls, hf: Mapping[str, Any]) -> ModelConfig:
        """Read an HF ``config.json`` dict (transformers 4 or 5 layout)."""
        model_type = hf.get("model_type")
        if model_type not in SUPPORTED_MODEL_TYPES:
            supported = ", ".join(SUPPORTED_MODEL_TYPES)
            raise CheckpointError(f"unsupported model_type {model_type!r}; supported: {supported}")
        if hf.get("hidden_act", "silu") != "silu":
            raise CheckpointError(f"unsupported hidden_act {hf['hidden_act']!r}; expected 'silu'")
        _warn_sliding_window(hf)
        try:
            return cls._from_llama_family(hf)
        except KeyError as missing:
            raise CheckpointError(f"config.json lacks {missing.args[0]!r}") from missing

    @classmethod
    def _from_llama_family(cls, hf: Mapping[str, Any]) -> ModelConfig:
        """The fields of a supported config dict (KeyError when a required one is absent)."""
        model_type = hf["model_type"]
        heads = int(hf["num_attention_heads"])
        theta, scaling = _rope_from_hf(hf)
        llama_bias = model_type == "llama" and bool(hf.get("attention_bias", False))
        return cls(
            model_type=model_type,
            vocab_size=int(hf["vocab_size"]),
            hidden_size=int(hf["hidden_size"]),
            intermediate_size=int(hf["intermediate_size"]),
            num_layers=int(hf["num_hidden_layers"]),
            num_heads=heads,
            num_kv_heads=int(hf.get("num_key_value_heads") or heads),
            head_dim=int(hf.get("head_dim") or hf["hidden_size"] // heads),
            rms_norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
            rope_theta=theta,
            rope_scaling=scaling,
            max_position_embeddings=int(hf.get("max_position_embeddings", 4096)),
            qkv_bias=model_type == "qwen2" or llama_bias,
            o_bias=llama_bias,
            mlp_bias=model_type == "llama" and bool(hf.get("mlp_bias", False)),
            tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)),
        )


def _rope_from_hf(hf: Mapping[str, Any]) -> tuple[float, RopeScaling | None]:
    """(rope_theta, scaling) from ``rope_parameters`` (transformers 5) or ``rope_scaling``."""
    params = dict(hf.get("rope_parameters") or hf.get("rope_scaling") or {})
    theta = float(params.get("rope_theta") or hf.get("rope_theta") or 10000.0)
    rope_type = params.get("rope_type", params.get("type", "default"))
    if rope_type == "default":
        return theta, None
    if rope_type == "linear":
        return theta, RopeScaling("linear", float(params["factor"]))
    if rope_type == "llama3":
        original = params.get("original_max_position_embeddings")
        return theta, RopeScaling(
            "llama3",
            factor=float(params["factor"]),
            low_freq_factor=float(params["low_freq_factor"]),
            high_freq_factor=float(params["high_freq_factor"]),
            original_max_position_embeddings=int(original or hf["max_position_embeddings"]),
        )
    raise CheckpointError(
        f"unsupported RoPE type {rope_type!r}; supported: default, linear, llama3"
    )


def _warn_sliding_window(hf: Mapping[str, Any]) -> None:
    """Log when the checkpoint expects sliding-window attention (this model is always full)."""
    window = hf.get("sliding_window")
    if hf.get("model_type") == "qwen2" and not hf.get("use_sliding_window", False):
        return
    if window and window < hf.get("max_position_embeddings", 0):
        logger.warning("sliding_window=%d is ignored: attention is full", window)


def rope_inv_freq(config: ModelConfig) -> torch.Tensor:
    """``[D // 2]`` float32 inverse frequencies, computed as transformers does (on CPU)."""
    dim = config.head_dim
    exponents = torch.arange(0, dim, 2, dtype=torch.int64, device="cpu").float() / dim
    inv_freq = 1.0 / (config.rope_theta**exponents)
    scaling = config.rope_scaling
    if scaling is None:
        return inv_freq
    if scaling.rope_type == "linear":
        return inv_freq / scaling.factor
    return _llama3_inv_freq(inv_freq, scaling)


def _llama3_inv_freq(inv_freq: torch.Tensor, s: RopeScaling) -> torch.Tensor:
    """Llama 3.1 scaling: keep high frequencies, divide low ones, interpolate in between."""
    low_freq_wavelen = s.original_max_position_embeddings / s.low_freq_factor
    high_freq_wavelen = s.original_max_position_embeddings / s.high_freq_factor
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > low_freq_wavelen, inv_freq / s.factor, inv_freq)
    smooth = (s.original_max_position_embeddings / wavelen - s.low_freq_factor) / (
        s.high_freq_factor - s.low_freq_factor
    )
    smoothed = (1 - smooth) * scaled / s.factor + smooth * scaled
    is_medium = ~(wavelen < high_freq_wavelen) * ~(wavelen > low_freq_wavelen)
    return torch.where(is_medium, smoothed, scaled)


class RotaryEmbedding:
    """cos/sin tables of RoPE, built lazily per device and grown on demand."""

    def __init__(self, config: ModelConfig) -> None:
        self.inv_freq = rope_inv_freq(config)  # [D/2] float32, CPU
        self._tables: dict[torch.device, tuple[torch.Tensor, torch.Tensor]] = {}

    def cos_sin(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """positions ``[T]`` long -> cos, sin ``[T, D]`` float32 on ``positions.device``.

        Reads ``positions.max()`` to size the table (one host sync per call on CUDA).
        """
        cos, sin = self._table(positions.device, int(positions.max()) + 1)
        return cos[positions], sin[positions]

    def _table(self, device: torch.device, length: int) -> tuple[torch.Tensor, torch.Tensor]:
        table = self._tables.get(device)
        if table is None or table[0].shape[0] < length:
            size = max(_MIN_ROPE_TABLE, 1 << (length - 1).bit_length())
            table = self._build(device, size)
            self._tables[device] = table
        return table

    def _build(self, device: torch.device, size: int) -> tuple[torch.Tensor, torch.Tensor]:
        inv_freq = self.inv_freq.to(device)
        freqs = torch.arange(size, device=device).float()[:, None] * inv_freq  # [P, D/2]
        emb = torch.cat((freqs, freqs), dim=-1)  # [P, D]
        return emb.cos(), emb.sin()


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    """``[..., D]`` -> ``[..., D]``: (x1, x2) -> (-x2, x1), the HF Llama convention."""
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x ``[T, H, D]``, cos/sin ``[T, D]`` float32 -> rotated x ``[T, H, D]`` in x's dtype."""
    x32 = x.float()
    out = x32 * cos[:, None, :] + rotate_half(x32) * sin[:, None, :]
    return out.to(x.dtype)


class RMSNorm(nn.Module):
    """Root-mean-square norm, computed in float32 like transformers' LlamaRMSNorm."""

    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``[..., dim]`` -> ``[..., dim]`` in x's dtype."""
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x32.to(x.dtype)


class Attention(nn.Module):
    """The projections of one attention block (the attention itself runs outside)."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        q_dim = config.num_heads * config.head_dim
        kv_dim = config.num_kv_heads * config.head_dim
        self.split = (q_dim, kv_dim, kv_dim)
        self.qkv_proj = nn.Linear(config.hidden_size, q_dim + 2 * kv_dim, bias=config.qkv_bias)
        self.o_proj = nn.Linear(q_dim, config.hidden_size, bias=config.o_bias)


class MLP(nn.Module):
    """SwiGLU: ``down(silu(gate(x)) * up(x))``, gate and up fused."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        width = config.intermediate_size
        self.gate_up_proj = nn.Linear(config.hidden_size, 2 * width, bias=config.mlp_bias)
        self.down_proj = nn.Linear(width, config.hidden_size, bias=config.mlp_bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``[T, hidden]`` -> ``[T, hidden]``."""
        gate, up = self.gate_up_proj(x).chunk(2, dim=-1)  # [T, I] each
        return self.down_proj(F.silu(gate) * up)


class DecoderLayer(nn.Module):
    """Pre-norm attention block followed by a pre-norm MLP block."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.self_attn = Attention(config)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.mlp = MLP(config)


class LlamaModel(nn.Module):
    """Llama-family causal LM with its forward split around attention (see module doc)."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.config = config
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(config) for _ in range(config.num_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.lm_head = (
            None
            if config.tie_word_embeddings
            else nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        )
        self.rope = RotaryEmbedding(config)

    @property
    def dtype(self) -> torch.dtype:
        """dtype of the weights and of the residual stream."""
        return self.embed_tokens.weight.dtype

    @property
    def device(self) -> torch.device:
        """Device of the weights."""
        return self.embed_tokens.weight.device

    def block(self, layer: int) -> DecoderLayer:
        """The decoder layer at index ``layer``."""
        return cast(DecoderLayer, self.layers[layer])

    def embed(self, token_ids: torch.Tensor) -> torch.Tensor:
        """token_ids ``[T]`` long -> residual stream ``[T, hidden]``."""
        return self.embed_tokens(token_ids)

    def attention_inputs(
        self,
        layer: int,
        h: torch.Tensor,
        positions: torch.Tensor,
        rope: tuple[torch.Tensor, torch.Tensor] | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """h ``[T, hidden]``, positions ``[T]`` long -> q ``[T, Hq, D]``, k, v ``[T, Hkv, D]``.

        Applies the layer's input RMSNorm, the q/k/v projections, and RoPE to q and k (in one
        pass: they are adjacent in the fused projection). ``rope``: ``self.rope.cos_sin(
        positions)``, computed once for every layer of a step; None computes it here.
        q and k are views of one ``[T, Hq + Hkv, D]`` tensor.
        """
        cfg = self.config
        block = self.block(layer)
        x = block.input_layernorm(h)  # [T, hidden]
        qkv = block.self_attn.qkv_proj(x)  # [T, (Hq + 2 Hkv) * D]
        q_dim, kv_dim, _ = block.self_attn.split
        qk, v = qkv.split((q_dim + kv_dim, kv_dim), dim=-1)  # [T, (Hq + Hkv) * D], [T, Hkv * D]
        cos, sin = self.rope.cos_sin(positions) if rope is None else rope  # [T, D] float32
        qk = apply_rope(qk.view(-1, cfg.num_heads + cfg.num_kv_heads, cfg.head_dim), cos, sin)
        q, k = qk.split((cfg.num_heads, cfg.num_kv_heads), dim=1)  # [T, Hq, D], [T, Hkv, D]
        return q, k, v.view(-1, cfg.num_kv_heads, cfg.head_dim)

    def attention_output(self, layer: int, h: torch.Tensor, attn: torch.Tensor) -> torch.Tensor:
        """h ``[T, hidden]`` (residual), attn ``[T, Hq, D]`` -> new residual ``[T, hidden]``.

        o_proj + residual, then post-attention RMSNorm, MLP + residual.
        """
        block = self.block(layer)
        h = h + block.self_attn.o_proj(attn.reshape(attn.shape[0], -1).to(h.dtype))
        return h + block.mlp(block.post_attention_layernorm(h))

    def logits(self, h: torch.Tensor) -> torch.Tensor:
        """h ``[T, hidden]`` -> logits ``[T, vocab]`` float32 (final norm + LM head)."""
        head = self.embed_tokens.weight if self.lm_head is None else self.lm_head.weight
        return F.linear(self.norm(h), head).float()

    def dense_forward(self, token_ids: torch.Tensor) -> torch.Tensor:
        """token_ids ``[T]`` of one sequence from position 0 -> logits ``[T, vocab]`` float32.

        Plain causal full attention: the reference the sparse paths are measured against.
        """
        positions = torch.arange(token_ids.shape[0], device=token_ids.device)  # [T]
        h = self.embed(token_ids)  # [T, hidden]
        rope = self.rope.cos_sin(positions)  # [T, D] x2
        for layer in range(self.config.num_layers):
            q, k, v = self.attention_inputs(layer, h, positions, rope)
            h = self.attention_output(layer, h, causal_attention(q, k, v))
        return self.logits(h)


def causal_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    scale: float | None = None,
) -> torch.Tensor:
    """Full causal GQA attention of the last T positions of one sequence over all S.

    The heads go to SDPA as ``[1, H, T, D]``: a 4-D layout takes its fused (flash) kernels,
    a 3-D one falls back to the math path, which materialises every score. The first query
    chunk (``T == S``) is causal by ``is_causal``. A later one on CPU attends in two fused
    passes merged by their log-sum-exp (``_merged_causal``): the earlier keys without a
    mask, its own last T keys with ``is_causal``; any mask costs SDPA's CPU kernel ~30% at
    8k. Elsewhere it takes an additive float mask (``causal_mask``), as SDPA aligns
    ``is_causal`` to the top left.

    Args:
        q: ``[T, Hq, D]`` queries of positions ``S - T .. S - 1``.
        k: ``[S, Hkv, D]`` keys of positions ``0 .. S - 1``.
        v: ``[S, Hkv, D]`` values.
        scale: softmax scale; None for ``D ** -0.5``.

    Returns:
        ``[T, Hq, D]`` in q's dtype.
    """
    t, s = q.shape[0], k.shape[0]
    if t < s and q.device.type == "cpu":
        return _merged_causal(q, k, v, scale)
    qh, kh, vh = (x.transpose(0, 1)[None] for x in (q, k, v))  # [1, H, T|S, D]
    if t == s:
        out = F.scaled_dot_product_attention(
            qh, kh, vh, is_causal=True, scale=scale, enable_gqa=True
        )
    else:
        mask = causal_mask(t, s, q.dtype, q.device)
        out = F.scaled_dot_product_attention(
            qh, kh, vh, attn_mask=mask, scale=scale, enable_gqa=True
        )
    return out[0].transpose(0, 1)  # [T, Hq, D]


def _merged_causal(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float | None
) -> torch.Tensor:
    """``causal_attention`` for ``T < S`` on CPU, without a mask: softmax over the earlier
    ``S - T`` keys and over the chunk's own keys (causal), each by the CPU flash kernel,
    which also returns the log-sum-exp ``l`` of each row's scores; the two outputs weighted
    by ``exp(l_i - logaddexp(l_1, l_2))`` are the softmax over all visible keys.

    The earlier keys are attended by every query head of a KV head at once (the group's
    queries laid end to end, ``[1, Hkv, G × T, D]``: no mask, so row order is free and K/V
    are not repeated); the chunk's own keys are repeated per query head (``T`` rows only).
    """
    t, s = q.shape[0], k.shape[0]
    hq, hkv, d = q.shape[1], k.shape[1], q.shape[2]
    group = hq // hkv
    flash = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu
    grouped = q.permute(1, 0, 2).reshape(hkv, group * t, d)[None]  # [1, Hkv, G*T, D]
    before, lse_before = flash(
        grouped, k[: s - t].transpose(0, 1)[None], v[: s - t].transpose(0, 1)[None], scale=scale
    )[:2]
    own_k, own_v = (x[s - t :].transpose(0, 1).repeat_interleave(group, 0)[None] for x in (k, v))
    own, lse_own = flash(q.transpose(0, 1)[None], own_k, own_v, is_causal=True, scale=scale)[:2]
    lse_before = lse_before[0].reshape(hq, t)
    total = torch.logaddexp(lse_before, lse_own[0])  # [Hq, T]
    out = before[0].reshape(hq, t, d) * torch.exp(lse_before - total)[..., None]
    out += own[0] * torch.exp(lse_own[0] - total)[..., None]
    return out.transpose(0, 1).to(q.dtype)  # [T, Hq, D]


def causal_mask(t: int, s: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """``[T, S]``: 0 where query ``i`` (position ``S - T + i``) sees key ``j``, -inf after."""
    rows = torch.arange(s - t, s, device=device)[:, None]  # [T, 1]
    after = torch.arange(s, device=device)[None, :] > rows  # [T, S]
    return torch.zeros((t, s), dtype=dtype, device=device).masked_fill_(after, float("-inf"))
