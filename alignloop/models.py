"""The only place where weights are loaded or built: causal LMs, sequence classifiers, LoRA,
tiny Llama-style models from scratch, and tokenizers trained on local text.

Everything is saved in Hugging Face format with safetensors, so `transformers` loads our outputs
directly and no pickle is ever read.
"""

from __future__ import annotations

import inspect
import json
import logging
import os
import shutil
import tempfile
from collections.abc import Iterable
from pathlib import Path

import torch
from transformers import (
    AutoModelForCausalLM,
    AutoModelForSequenceClassification,
    AutoTokenizer,
    LlamaConfig,
    LlamaForCausalLM,
    PreTrainedModel,
    PreTrainedTokenizerBase,
    PreTrainedTokenizerFast,
)

from alignloop.config import LoRAConfig, ModelConfig, TinyModelConfig

log = logging.getLogger(__name__)

SPECIAL_TOKENS = {
    "pad_token": "<|pad|>",
    "eos_token": "<|eos|>",
    "bos_token": "<|bos|>",
}
ROLE_TOKENS = ["<|system|>", "<|user|>", "<|assistant|>"]

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class ModelError(RuntimeError):
    """A model or tokenizer cannot be loaded or built as asked."""


def cpu_has_native_bf16() -> bool:
    """True when this CPU runs bf16 matmuls natively (AVX-512 BF16 / AMX); elsewhere bf16 is ~40x slower."""
    capability = torch.backends.cpu.get_cpu_capability()
    if capability not in ("AVX512", "AVX512_BF16", "AMX"):
        return False
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            flags = f.read()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def resolve_dtype(name: str, device: torch.device | str = "cpu") -> torch.dtype:
    """torch dtype for a config name; refuses bf16 on a CPU that lacks it."""
    if name not in _DTYPES:
        raise ModelError(f"model.dtype: unknown dtype {name!r} (choose from {sorted(_DTYPES)})")
    dtype = _DTYPES[name]
    if dtype == torch.bfloat16 and torch.device(device).type == "cpu" and not cpu_has_native_bf16():
        raise ModelError(
            "model.dtype: bfloat16 requested on a CPU without native bf16 "
            f"(capability {torch.backends.cpu.get_cpu_capability()}); use float32"
        )
    return dtype


def train_tokenizer(
    texts: Iterable[str], vocab_size: int = 1024, chat_template: str | None = None
) -> PreTrainedTokenizerFast:
    """Train a byte-level BPE tokenizer on `texts` with our special and role tokens.

    The chat template defaults to `alignloop.tokenization.DEFAULT_CHAT_TEMPLATE` so that a saved tokenizer
    formats conversations the same way everywhere (trainers, `generate`, serving).
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    from alignloop.tokenization import DEFAULT_CHAT_TEMPLATE

    specials = [SPECIAL_TOKENS["pad_token"], SPECIAL_TOKENS["bos_token"], SPECIAL_TOKENS["eos_token"], *ROLE_TOKENS]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=2,
        special_tokens=specials,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    wrapped = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        model_max_length=4096,
        additional_special_tokens=ROLE_TOKENS,
        **SPECIAL_TOKENS,
    )
    wrapped.chat_template = chat_template or DEFAULT_CHAT_TEMPLATE
    return wrapped


def tiny_model(cfg: TinyModelConfig, tokenizer: PreTrainedTokenizerBase, seed: int = 0) -> LlamaForCausalLM:
    """A Llama-style causal LM built from scratch (random init from `seed`) sized for `tokenizer`."""
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=cfg.hidden_size,
        intermediate_size=cfg.intermediate_size,
        num_hidden_layers=cfg.num_layers,
        num_attention_heads=cfg.num_heads,
        num_key_value_heads=cfg.num_heads,
        max_position_embeddings=cfg.max_position_embeddings,
        attention_dropout=cfg.attention_dropout,
        tie_word_embeddings=cfg.tie_word_embeddings,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = LlamaForCausalLM(config)
    return model


def accepts_logits_to_keep(model: torch.nn.Module) -> bool:
    """Whether forward takes `logits_to_keep`: the prefill then computes one row of logits per
    prompt instead of (B, P, V). A peft wrapper passes it through to its base model."""
    model = getattr(model, "module", model)  # DistributedDataParallel passes keywords through
    get_base = getattr(model, "get_base_model", None)
    base = get_base() if callable(get_base) else model
    return "logits_to_keep" in inspect.signature(base.forward).parameters


def load_tokenizer(name_or_path: str) -> PreTrainedTokenizerBase:
    """Load a tokenizer by hub name or folder; a missing pad token falls back to EOS (data.py keeps EOS labels).

    Encoder tokenizers (BERT-like) have no EOS but a separator that ends a sequence: it serves as EOS,
    so an encoder can be a reward model on the same tokenised conversations.
    """
    try:
        tokenizer = AutoTokenizer.from_pretrained(name_or_path)
    except (OSError, ValueError) as err:
        raise ModelError(f"cannot load tokenizer {name_or_path!r}: {err}") from err
    if tokenizer.eos_token is None and getattr(tokenizer, "sep_token", None) is not None:
        tokenizer.eos_token = tokenizer.sep_token
    if tokenizer.pad_token is None:
        if tokenizer.eos_token is None:
            raise ModelError(f"tokenizer {name_or_path!r} has neither a pad nor an EOS token")
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_causal_lm(name_or_path: str, dtype: str = "float32", lora: LoRAConfig | None = None) -> PreTrainedModel:
    """Load a causal LM by hub name or folder (safetensors only), optionally wrapped with LoRA adapters."""
    try:
        model = AutoModelForCausalLM.from_pretrained(
            name_or_path, dtype=resolve_dtype(dtype), use_safetensors=True
        )
    except (OSError, ValueError) as err:
        raise ModelError(f"cannot load causal LM {name_or_path!r}: {err}") from err
    return apply_lora(model, lora, task_type="CAUSAL_LM") if lora and lora.r > 0 else model


def num_heads(model_dir: str | Path) -> int:
    """Number of score heads saved in a model folder (rows of `score.weight`; 1 when it has no head yet).

    Read from the safetensors header, since the config does not say: transformers omits the default
    2-label `id2label` when saving, and loading with another `num_labels` silently re-initialises the head.
    """
    from safetensors import safe_open

    folder = Path(model_dir)
    files = [folder / "model.safetensors"]
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        shard = json.loads(index.read_text(encoding="utf-8"))["weight_map"].get("score.weight")
        files = [folder / shard] if shard else []
    for path in files:
        if path.is_file():
            with safe_open(str(path), framework="pt") as f:
                if "score.weight" in f.keys():  # noqa: SIM118 (safe_open is not a mapping)
                    return int(f.get_slice("score.weight").get_shape()[0])
    return 1


def load_sequence_classifier(
    name_or_path: str, dtype: str = "float32", num_labels: int | None = None, lora: LoRAConfig | None = None
) -> PreTrainedModel:
    """Load a model with a scalar (or `num_labels`) head on top: causal LM or encoder backbones alike.

    `num_labels=None` keeps the heads a saved reward model already has (`num_heads`), or one fresh head
    on a backbone: passing another count would silently re-initialise a trained head.
    """
    if num_labels is None:
        num_labels = num_heads(name_or_path) if Path(name_or_path).is_dir() else 1
    try:
        model = AutoModelForSequenceClassification.from_pretrained(
            name_or_path, num_labels=num_labels, dtype=resolve_dtype(dtype), use_safetensors=True
        )
    except (OSError, ValueError) as err:
        raise ModelError(f"cannot load sequence classifier {name_or_path!r}: {err}") from err
    return apply_lora(model, lora, task_type="SEQ_CLS") if lora and lora.r > 0 else model


def apply_lora(model: PreTrainedModel, lora: LoRAConfig, task_type: str) -> PreTrainedModel:
    """Wrap `model` with peft LoRA adapters; only adapter (and head) weights stay trainable."""
    from peft import LoraConfig, get_peft_model

    peft_config = LoraConfig(
        r=lora.r,
        lora_alpha=lora.alpha,
        lora_dropout=lora.dropout,
        target_modules=list(lora.target_modules),
        task_type=task_type,
    )
    return get_peft_model(model, peft_config)  # type: ignore[return-value]


def build_policy(
    cfg: ModelConfig, *, corpus: Iterable[str] | None = None, seed: int = 0
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """The (model, tokenizer) a trainer starts from: loaded by name/path, or tiny and built from scratch.

    For a tiny model without a tokenizer path, a tokenizer is trained on `corpus` (the training text).
    """
    if cfg.name_or_path:
        tokenizer = load_tokenizer(cfg.tokenizer or cfg.name_or_path)
        return load_causal_lm(cfg.name_or_path, cfg.dtype, cfg.lora), tokenizer
    if cfg.tokenizer:
        tokenizer = load_tokenizer(cfg.tokenizer)
    elif corpus is not None:
        tokenizer = train_tokenizer(corpus, vocab_size=cfg.tokenizer_vocab_size)
    else:
        raise ModelError("model.name_or_path is empty: a tiny model needs model.tokenizer or a text corpus")
    model = tiny_model(cfg.tiny, tokenizer, seed=seed).to(resolve_dtype(cfg.dtype))
    if cfg.lora.r > 0:
        model = apply_lora(model, cfg.lora, task_type="CAUSAL_LM")
    return model, tokenizer


def save_pretrained(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase | None, out_dir: str | Path) -> Path:
    """Save model (+ tokenizer) in Hugging Face format with safetensors, atomically (temp dir, fsync, rename).

    LoRA models are merged into their base first so the folder loads with plain `transformers`.
    """
    out = Path(out_dir)
    out.parent.mkdir(parents=True, exist_ok=True)
    if hasattr(model, "merge_and_unload"):
        model = model.merge_and_unload()
    tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{out.name}-", dir=out.parent))
    try:
        model.save_pretrained(tmp, safe_serialization=True)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        for path in tmp.iterdir():
            with open(path, "rb") as f:
                os.fsync(f.fileno())
        if out.exists():
            shutil.rmtree(out)
        os.replace(tmp, out)
        dir_fd = os.open(out.parent, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return out


def count_parameters(model: torch.nn.Module, trainable_only: bool = False) -> int:
    """Number of (trainable) parameters, counting tied weights once."""
    seen: set[int] = set()
    total = 0
    for p in model.parameters():
        if id(p) in seen or (trainable_only and not p.requires_grad):
            continue
        seen.add(id(p))
        total += p.numel()
    return total
