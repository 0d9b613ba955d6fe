"""Loss functions against hand-computed values; purity of the math modules."""

from __future__ import annotations

import math
import subprocess
import sys

import torch

from alignloop.losses import sft_nll


def test_sft_nll_hand_computed_and_gradient():
    logp = torch.tensor([[math.log(0.5), math.log(0.25), -9.0]], dtype=torch.float64, requires_grad=True)
    mask = torch.tensor([[1, 1, 0]])
    loss, stats = sft_nll(logp, mask, num_loss_tokens=4)
    expected = (math.log(2) + math.log(4)) / 4
    assert abs(loss.item() - expected) < 1e-12
    assert stats["sft/tokens"].item() == 2
    loss.backward()
    assert torch.equal(logp.grad, torch.tensor([[-0.25, -0.25, 0.0]], dtype=torch.float64))


def test_split_batches_sum_to_the_global_loss():
    """Normalising by the global token count makes micro-batch losses add up to the full-batch loss."""
    g = torch.Generator().manual_seed(1)
    logp = -torch.rand(6, 7, generator=g, dtype=torch.float64)
    mask = (torch.rand(6, 7, generator=g) > 0.3).long()
    n = int(mask.sum())
    full, _ = sft_nll(logp, mask, n)
    parts = sum(sft_nll(logp[i : i + 2], mask[i : i + 2], n)[0] for i in range(0, 6, 2))
    assert abs(full.item() - parts.item()) < 1e-12


def test_pure_math_modules_do_not_load_model_libraries():
    code = (
        "import sys, alignloop.losses, alignloop.tensors;"
        "bad=[m for m in ('transformers','peft','accelerate','datasets') if m in sys.modules];"
        "assert not bad, bad"
    )
    subprocess.run([sys.executable, "-c", code], check=True)
