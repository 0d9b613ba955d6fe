"""A lean decoding forward for Llama-architecture models over a preallocated KV cache.

`transformers`' forward is built for every case (cache classes, mask factories, attention registries,
output dataclasses), and with small models on a CPU that per-call machinery, not arithmetic, is most of a
decode step. This forward reads the model's own parameters and modules (LoRA-wrapped projections run as
modules, so adapters apply) and replaces the glue: rotary tables computed once, keys and values written
in place into one (layers, B, kv_heads, P + R, head_dim) buffer, one boolean key mask per step,
`scaled_dot_product_attention` with grouped heads, the LM head on the last position only, and plain
projections multiplied as fused, transposed matrices (q/k/v in one product, gate/up in one): a decode step
multiplies 16-odd rows by every matrix, and on the Intel Xeons we measured `F.linear`'s (out, in) layout is
several times slower for that than (in, out) (on an AVX2 AMD EPYC the two are level: docs/benchmarks.md).
Those matrices are not copies where that can be avoided: `DecodeWeights` lays each parameter out again as
a view of its fused matrix for one `generate` call and puts it back afterwards, so generation needs no second
model's worth of memory. It reproduces the transformers forward to float rounding
(tests compare logits); `supports()` says when it applies, and everything else takes the transformers path.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
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


def _owns_its_storage(weight: torch.Tensor) -> bool:
    """A plain parameter that is the whole of a storage torch allocated: laying it out again frees the old
    layout. Not a view (an FSDP flat parameter, a shared buffer), and not memory torch did not allocate: the
    weights `from_pretrained` maps from a safetensors file stay resident as long as any tensor of that file
    does, so moving them would hold the model twice (those are copied for the call instead)."""
    data = weight.data
    storage = data.untyped_storage()
    return (isinstance(weight, torch.nn.Parameter) and type(data) is torch.Tensor and data.is_contiguous()
            and storage.resizable() and data.storage_offset() == 0
            and storage.nbytes() == data.numel() * data.element_size())


def compute_dtype(param: torch.Tensor) -> torch.dtype:
    """The dtype products run in: autocast's where it is on for the parameter's device (it leaves float64
    alone), else the parameter's."""
    device = param.device.type
    casts = torch.is_autocast_enabled(device) and param.is_floating_point() and param.dtype != torch.float64
    return torch.get_autocast_dtype(device) if casts else param.dtype


def _fused(modules: tuple[Any, ...], relay: bool, dtype: torch.dtype) -> torch.Tensor:
    """The modules' weights stacked on the output axis and stored (in, out), contiguous, in `dtype`. With
    `relay` (only where `dtype` is the weights'), each weight then becomes a view of its block (same shape and
    values, strides (1, sum of outs)) and its old storage is freed, so the fused matrix costs no memory of its
    own."""
    with torch.no_grad():
        weight = modules[0].weight
        out = torch.empty((weight.shape[1], sum(m.weight.shape[0] for m in modules)),
                          dtype=dtype, device=weight.device)  # (in, sum of outs)
        start = 0
        for m in modules:
            rows = m.weight.shape[0]
            out[:, start : start + rows] = m.weight.t()
            if relay:
                m.weight.data = out[:, start : start + rows].t()
            start += rows
    return out


class DecodeWeights:
    """Every layer's ([q; k; v], o, [gate; up], down) and the LM head, stored (in, out), for one `generate` call.

    A layer whose projections are not all plain bias-free Linears (LoRA adapters, biases) gets None and runs
    module by module. Parameters that own their storage are laid out as views of these matrices rather than
    copied (the model's weights stay in memory once); `release()` makes each contiguous (out, in) again, layer
    by layer, so memory never holds a second model either way. Under autocast the matrices are cast copies in
    autocast's dtype, made once per call: autocast would otherwise cast every weight again at every decode step
    (it caches casts of leaf parameters only, and these matrices are not), which made bf16 generation slower
    than fp32. Built per call, never cached: optimizers (fused AdamW) update weights in place unseen, and
    training must see its usual layout.
    """

    def __init__(self, model: torch.nn.Module) -> None:
        base = _base(model)
        silu = getattr(base.config, "hidden_act", None) == "silu"
        dtype = compute_dtype(next(base.parameters()))
        self._relaid: list[list[Any]] = []  # per entry of `layers` (then the LM head): the modules laid out again
        self.layers: list[tuple[torch.Tensor, ...] | None] = []
        self.lm_head: torch.Tensor | None = None
        try:
            for layer in base.model.layers:
                attn, mlp = layer.self_attn, layer.mlp
                groups = ((attn.q_proj, attn.k_proj, attn.v_proj), (attn.o_proj,), (mlp.gate_proj, mlp.up_proj),
                          (mlp.down_proj,))
                relaid: list[Any] = []
                self._relaid.append(relaid)  # recorded as each group moves, so a failure part-way can be undone
                self.layers.append(None)
                if not silu or not all(_plain_linear(m) for group in groups for m in group):
                    continue
                matrices = []
                for group in groups:
                    relay = all(_owns_its_storage(m.weight) and m.weight.dtype == dtype for m in group)
                    matrices.append(_fused(group, relay, dtype))  # fails, if at all, allocating: before moving any weight
                    relaid.extend(group if relay else ())
                self.layers[-1] = tuple(matrices)
            head = base.lm_head
            relay_head = _plain_linear(head) and _owns_its_storage(head.weight) and head.weight.dtype == dtype
            self._relaid.append([])
            self.lm_head = _fused((head,), relay_head, dtype) if _plain_linear(head) else None
            self._relaid[-1].extend([head] if relay_head else [])
        except BaseException:
            self.release()  # the model keeps its own layout whatever happened (out of memory, an interrupt)
            raise

    def release(self) -> None:
        """Give every laid-out parameter back its contiguous (out, in) layout; the fused matrices are dropped
        one layer at a time, so the peak is one layer above the model's own memory."""
        with torch.no_grad():
            for i, modules in enumerate(self._relaid):
                for m in modules:
                    m.weight.data = m.weight.data.contiguous()
                if i < len(self.layers):
                    self.layers[i] = None
                else:
                    self.lm_head = None
            self._relaid = []


@contextmanager
def decode_weights(model: torch.nn.Module) -> Iterator[DecodeWeights]:
    """`DecodeWeights` for the block's duration; the model's layout is restored even when the block raises."""
    weights = DecodeWeights(model)
    try:
        yield weights
    finally:
        weights.release()


class LlamaDecoder:
    """Prefill a left-padded batch, then decode one token per row per call, over a fixed-size cache."""

    def __init__(self, model: torch.nn.Module, batch: int, max_len: int, weights: DecodeWeights) -> None:
        base = _base(model)
        self.inner, self.lm_head, config = base.model, base.lm_head, base.config
        self.layers = list(self.inner.layers)
        self.matrices = weights
        attn = self.layers[0].self_attn
        self.head_dim, self.scaling = attn.head_dim, attn.scaling
        self.heads = config.num_attention_heads
        self.kv_heads = config.num_key_value_heads
        param = next(base.parameters())
        device, dtype = param.device, compute_dtype(param)
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
        fused = self.matrices.layers[i]
        if fused is not None:
            out = torch.matmul(x, fused[0])
        else:
            attn = self.layers[i].self_attn
            out = torch.cat([attn.q_proj(x), attn.k_proj(x), attn.v_proj(x)], dim=-1)
        return out.view(batch, new, self.heads + 2 * self.kv_heads, self.head_dim)

    def _attention_out(self, i: int, out: torch.Tensor) -> torch.Tensor:
        fused = self.matrices.layers[i]
        return torch.matmul(out, fused[1]) if fused is not None else self.layers[i].self_attn.o_proj(out)

    def _mlp(self, i: int, x: torch.Tensor) -> torch.Tensor:
        fused = self.matrices.layers[i]
        if fused is None:
            return self.layers[i].mlp(x)
        _, _, gate_up, down = fused
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
        head = self.matrices.lm_head
        return torch.matmul(last, head) if head is not None else self.lm_head(last)  # (B, V)

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
