"""A lean decoding forward for Llama-architecture models over a preallocated KV cache.

`transformers`' forward is built for every case (cache classes, mask factories, attention registries,
output dataclasses), and with small models on a CPU that per-call machinery, not arithmetic, is most of a
decode step. This forward reads the model's own parameters and modules (LoRA-wrapped projections run as
modules, so adapters apply) and replaces the glue: rotary tables computed once, keys and values written
in place into one (layers, B, kv_heads, P + R, head_dim) buffer, one boolean key mask per step,
`scaled_dot_product_attention` with grouped heads, the LM head on the last position only, and plain
projections multiplied as fused, transposed copies (q/k/v in one product, gate/up in one) made once per
decoder: a decode step multiplies 16-odd rows by every matrix, and on a CPU `F.linear`'s (out, in) layout
is several times slower for that than (in, out). The copies cost one model's worth of memory per decoder.
It reproduces the transformers forward to float rounding (tests compare logits); `supports()` says when
it applies, and everything else takes the transformers path.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

_SUPPORTED = {"llama"}
"""`config.model_type`s whose decoder layer is exactly: pre-norm attention with rotary, pre-norm MLP."""


def _base(model: torch.nn.Module) -> Any:
    get_base = getattr(model, "get_base_model", None)  # a peft wrapper: its modules carry the adapters
    return get_base() if callable(get_base) else model


def supports(model: torch.nn.Module) -> bool:
    """Whether this forward reproduces `model`'s: a Llama causal LM with default rotary embeddings (scaled
    variants such as linear, dynamic or llama3 take the transformers path) and full attention."""
    base = _base(model)
    config = getattr(base, "config", None)
    inner = getattr(base, "model", None)
    if config is None or inner is None or getattr(config, "model_type", None) not in _SUPPORTED:
        return False
    rotary = getattr(inner, "rotary_emb", None)
    return (rotary is not None and getattr(rotary, "rope_type", "default") == "default"
            and getattr(config, "pretraining_tp", 1) == 1 and hasattr(base, "lm_head"))


def _plain_linear(module: Any) -> bool:
    return type(module) is torch.nn.Linear and module.bias is None


def _transposed(*modules: Any) -> torch.Tensor:
    """The modules' weights stacked on the output axis and stored (in, out), contiguous: a decode step multiplies
    a few rows by each matrix, and on a CPU that product is several times faster on this layout than `F.linear`
    on (out, in). Built per decoder, never cached: optimizers (fused AdamW) update weights in place unseen."""
    with torch.no_grad():
        out = torch.empty((modules[0].weight.shape[1], sum(m.weight.shape[0] for m in modules)),
                          dtype=modules[0].weight.dtype, device=modules[0].weight.device)  # (in, sum of outs)
        start = 0
        for m in modules:
            out[:, start : start + m.weight.shape[0]] = m.weight.t()
            start += m.weight.shape[0]
    return out


def _layer_weights(layer: torch.nn.Module) -> tuple[torch.Tensor, ...] | None:
    """([q; k; v], o, [gate; up], down) transposed; None when a projection is not a plain bias-free Linear
    (LoRA adapters, biases), and that layer then runs module by module."""
    attn, mlp = layer.self_attn, layer.mlp
    if not all(_plain_linear(m) for m in (attn.q_proj, attn.k_proj, attn.v_proj, attn.o_proj, mlp.gate_proj,
                                           mlp.up_proj, mlp.down_proj)):
        return None
    return (_transposed(attn.q_proj, attn.k_proj, attn.v_proj), _transposed(attn.o_proj),
            _transposed(mlp.gate_proj, mlp.up_proj), _transposed(mlp.down_proj))


class LlamaDecoder:
    """Prefill a left-padded batch, then decode one token per row per call, over a fixed-size cache."""

    def __init__(self, model: torch.nn.Module, batch: int, max_len: int) -> None:
        base = _base(model)
        self.inner, self.lm_head, config = base.model, base.lm_head, base.config
        self.layers = list(self.inner.layers)
        silu = getattr(config, "hidden_act", None) == "silu"
        self.weights = [_layer_weights(layer) if silu else None for layer in self.layers]
        self.lm_head_t = _transposed(self.lm_head) if _plain_linear(self.lm_head) else None
        attn = self.layers[0].self_attn
        self.head_dim, self.scaling = attn.head_dim, attn.scaling
        self.heads = config.num_attention_heads
        self.kv_heads = config.num_key_value_heads
        param = next(base.parameters())
        device = param.device
        dtype = torch.get_autocast_dtype("cpu") if torch.is_autocast_enabled("cpu") and device.type == "cpu" else param.dtype
        if device.type == "cuda" and torch.is_autocast_enabled("cuda"):
            dtype = torch.get_autocast_dtype("cuda")
        shape = (len(self.layers), batch, self.kv_heads, max_len, self.head_dim)
        self.keys = torch.zeros(shape, dtype=dtype, device=device)  # (L, B, Hkv, T, D)
        self.values = torch.zeros(shape, dtype=dtype, device=device)  # (L, B, Hkv, T, D)
        rotary = self.inner.rotary_emb
        positions = torch.arange(max_len, device=device, dtype=torch.float32)
        freqs = positions[:, None] * rotary.inv_freq.to(device=device, dtype=torch.float32)[None]  # (T, D/2)
        emb = torch.cat((freqs, freqs), dim=-1)  # (T, D)
        self.cos = emb.cos() * rotary.attention_scaling  # (T, D)
        half = self.head_dim // 2
        sign = torch.cat([-torch.ones(half, device=device), torch.ones(half, device=device)])  # rotate_half's signs
        self.sin = emb.sin() * rotary.attention_scaling * sign  # (T, D): rotate_half(x) * sin == roll(x) * self.sin
        self.key_mask = torch.zeros((batch, max_len), dtype=torch.bool, device=device)  # (B, T) real tokens
        self.length = 0

    def _norm(self, norm: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
        """RMSNorm in float32, cast back, then the weight: transformers' arithmetic in one fused op."""
        return norm.weight * F.rms_norm(x.float(), (x.shape[-1],), eps=norm.variance_epsilon).to(x.dtype)

    def _attention_in(self, i: int, x: torch.Tensor) -> torch.Tensor:
        """(B, S, H) -> (B, S, Hq + 2 * Hkv, D): queries, keys and values."""
        batch, new = x.shape[:2]
        if self.weights[i] is not None:
            out = torch.matmul(x, self.weights[i][0])
        else:
            attn = self.layers[i].self_attn
            out = torch.cat([attn.q_proj(x), attn.k_proj(x), attn.v_proj(x)], dim=-1)
        return out.view(batch, new, self.heads + 2 * self.kv_heads, self.head_dim)

    def _attention_out(self, i: int, out: torch.Tensor) -> torch.Tensor:
        return torch.matmul(out, self.weights[i][1]) if self.weights[i] is not None else self.layers[i].self_attn.o_proj(out)

    def _mlp(self, i: int, x: torch.Tensor) -> torch.Tensor:
        if self.weights[i] is None:
            return self.layers[i].mlp(x)
        _, _, gate_up, down = self.weights[i]
        gate, up = torch.matmul(x, gate_up).chunk(2, dim=-1)
        return torch.matmul(F.silu(gate) * up, down)

    def _layers(self, hidden: torch.Tensor, positions: torch.Tensor, attn_mask: torch.Tensor) -> torch.Tensor:
        """Run the decoder layers on the new positions, writing their keys/values at [length, length + S)."""
        batch, new = hidden.shape[:2]
        cos = self.cos[positions].unsqueeze(2).to(hidden.dtype)  # (B, S, 1, D)
        sin = self.sin[positions].unsqueeze(2).to(hidden.dtype)  # (B, S, 1, D)
        end, rotated = self.length + new, self.heads + self.kv_heads
        for i, layer in enumerate(self.layers):
            x = self._norm(layer.input_layernorm, hidden)  # (B, S, H)
            qkv = self._attention_in(i, x)  # (B, S, Hq + 2 Hkv, D)
            qk = qkv[:, :, :rotated]  # (B, S, Hq + Hkv, D): rotary on queries and keys at once
            qk = torch.addcmul(qk * cos, qk.roll(self.head_dim // 2, dims=-1), sin)
            q = qk[:, :, : self.heads].transpose(1, 2)  # (B, Hq, S, D)
            self.keys[i, :, :, self.length : end] = qk[:, :, self.heads :].transpose(1, 2)
            self.values[i, :, :, self.length : end] = qkv[:, :, rotated:].transpose(1, 2)
            out = F.scaled_dot_product_attention(
                q, self.keys[i, :, :, :end].to(q.dtype), self.values[i, :, :, :end].to(q.dtype), attn_mask=attn_mask,
                scale=self.scaling, enable_gqa=self.kv_heads != self.heads)  # (B, Hq, S, D)
            hidden = hidden + self._attention_out(i, out.transpose(1, 2).reshape(batch, new, -1))
            hidden = hidden + self._mlp(i, self._norm(layer.post_attention_layernorm, hidden))
        self.length = end
        return hidden

    def _last_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        last = self._norm(self.inner.norm, hidden[:, -1])  # (B, H)
        return torch.matmul(last, self.lm_head_t) if self.lm_head_t is not None else self.lm_head(last)  # (B, V)

    @torch.no_grad()
    def prefill(self, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Left-padded prompts (B, P) -> next-token logits (B, V); positions count real tokens only."""
        width = ids.shape[1]
        real = mask.bool()  # (B, P)
        self.key_mask[:, :width] = real
        positions = (mask.long().cumsum(-1) - 1).clamp(min=0)  # (B, P)
        causal = torch.ones((width, width), dtype=torch.bool, device=ids.device).tril()  # (P, P)
        # a padding query sees itself, so its softmax is defined; no real token ever attends to it
        allowed = (causal[None] & real[:, None, :]) | torch.eye(width, dtype=torch.bool, device=ids.device)[None]
        hidden = self._layers(self.inner.embed_tokens(ids), positions, allowed[:, None])  # (B, P, H)
        self.next_position = positions[:, -1:] + 1  # (B, 1)
        return self._last_logits(hidden)

    @torch.no_grad()
    def step(self, tokens: torch.Tensor) -> torch.Tensor:
        """One new token per row (B,) -> next-token logits (B, V)."""
        self.key_mask[:, self.length] = True
        attn_mask = self.key_mask[:, None, None, : self.length + 1]  # (B, 1, 1, T)
        hidden = self._layers(self.inner.embed_tokens(tokens[:, None]), self.next_position, attn_mask)
        self.next_position = self.next_position + 1
        return self._last_logits(hidden)
