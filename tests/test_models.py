"""Models: tokenizer training, tiny models, Hugging Face round trips, LoRA, dtype policy."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from alignloop import models
from alignloop.config import LoRAConfig, ModelConfig, TinyModelConfig

CORPUS = [f"the {c} cat number {i} sat on mat {i % 7}" for i in range(300) for c in ("red", "blue", "green")]
TINY = TinyModelConfig(hidden_size=32, intermediate_size=64, num_layers=2, num_heads=2, max_position_embeddings=64)


@pytest.fixture(scope="module")
def tokenizer():
    return models.train_tokenizer(CORPUS, vocab_size=300)


def test_tokenizer_has_specials_and_template(tokenizer):
    assert tokenizer.pad_token == "<|pad|>" and tokenizer.eos_token == "<|eos|>"
    assert tokenizer.pad_token_id != tokenizer.eos_token_id
    assert "<|assistant|>" in tokenizer.all_special_tokens
    assert tokenizer.chat_template
    text = "the red cat sat"
    assert tokenizer.decode(tokenizer.encode(text, add_special_tokens=False)) == text


def test_tiny_model_saves_as_safetensors_and_loads_with_transformers(tokenizer, tmp_path):
    model = models.tiny_model(TINY, tokenizer, seed=3)
    out = models.save_pretrained(model, tokenizer, tmp_path / "m")
    files = {p.name for p in out.iterdir()}
    assert "model.safetensors" in files and "tokenizer.json" in files
    assert not [f for f in files if f.endswith((".bin", ".pt", ".pkl"))]
    assert not list(tmp_path.glob(".tmp-*"))
    loaded = AutoModelForCausalLM.from_pretrained(out)
    ids = torch.tensor([tokenizer.encode("the red cat")])
    assert torch.equal(model(ids).logits, loaded(ids).logits)
    assert AutoTokenizer.from_pretrained(out).encode("the red cat") == tokenizer.encode("the red cat")
    via_ours = models.load_causal_lm(str(out))
    assert torch.equal(via_ours(ids).logits, loaded(ids).logits)


def test_tiny_model_init_depends_only_on_seed(tokenizer):
    a = models.tiny_model(TINY, tokenizer, seed=1)
    torch.manual_seed(123)  # global RNG must not matter
    b = models.tiny_model(TINY, tokenizer, seed=1)
    c = models.tiny_model(TINY, tokenizer, seed=2)
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values(), strict=True))
    assert not torch.equal(a.model.embed_tokens.weight, c.model.embed_tokens.weight)


def test_sequence_classifier_from_a_causal_lm_folder(tokenizer, tmp_path):
    out = models.save_pretrained(models.tiny_model(TINY, tokenizer), tokenizer, tmp_path / "m")
    rm = models.load_sequence_classifier(str(out))
    ids = torch.tensor([tokenizer.encode("the red cat")])
    assert rm(ids).logits.shape == (1, 1)


def test_saved_ensemble_head_is_reloaded_not_reinitialised(tokenizer, tmp_path):
    backbone = models.save_pretrained(models.tiny_model(TINY, tokenizer), tokenizer, tmp_path / "m")
    rm = models.load_sequence_classifier(str(backbone), num_labels=3)
    saved = models.save_pretrained(rm, tokenizer, tmp_path / "rm")
    assert models.num_heads(saved) == 3 and models.num_heads(backbone) == 1
    again = models.load_sequence_classifier(str(saved))
    assert torch.equal(again.score.weight, rm.score.weight)


def test_missing_model_is_a_named_error(tmp_path):
    with pytest.raises(models.ModelError, match="nothing-here"):
        models.load_causal_lm(str(tmp_path / "nothing-here"))


def test_lora_trains_only_adapters_and_merges_on_save(tokenizer, tmp_path):
    cfg = ModelConfig(tokenizer="x", tiny=TINY, lora=LoRAConfig(r=4, alpha=8, target_modules=["q_proj", "v_proj"]))
    model = models.apply_lora(models.tiny_model(cfg.tiny, tokenizer), cfg.lora, task_type="CAUSAL_LM")
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.fill_(0.01)
    ids = torch.tensor([tokenizer.encode("the red cat")])
    expected = model(ids).logits
    out = models.save_pretrained(model, tokenizer, tmp_path / "merged")
    merged = AutoModelForCausalLM.from_pretrained(out)
    assert torch.allclose(merged(ids).logits, expected, atol=1e-5)


def test_bf16_refused_without_native_support(monkeypatch):
    monkeypatch.setattr(models, "cpu_has_native_bf16", lambda: False)
    with pytest.raises(models.ModelError, match="bfloat16"):
        models.resolve_dtype("bfloat16")
    assert models.resolve_dtype("float32") == torch.float32
    with pytest.raises(models.ModelError, match="unknown dtype"):
        models.resolve_dtype("float8")


def test_count_parameters_counts_tied_weights_once(tokenizer):
    model = models.tiny_model(TINY, tokenizer)
    assert model.lm_head.weight is model.model.embed_tokens.weight
    assert models.count_parameters(model) == sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())
