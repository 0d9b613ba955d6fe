"""Evaluation of a policy: generate on held-out prompts and score with any judge.

The judge is a callable `(prompt_messages, response) -> scores` whose result has `helpful`,
`honest`, `harmless`, `overall` and `well_formed` attributes (the sandbox's gold judge is one);
nothing here knows how it decides.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from alignloop.config import GenConfig
from alignloop.data import Prompt
from alignloop.generation import decode_responses, generate
from alignloop.tokenization import encode_prompt

AXES = ("helpful", "honest", "harmless", "overall")
CLOSE_GAP = 0.2
"""gold overall scores at most this far apart (and not equal): a close pair"""
CLEAR_GAP = 0.5
"""gold overall scores at least this far apart: a clear pair"""


@dataclass
class PolicyEval:
    """Mean judge scores overall and by prompt kind, plus every (prompt, response, scores) row."""

    means: dict[str, float]
    by_kind: dict[str, dict[str, float]]
    rows: list[tuple[Prompt, str, Any]] = field(default_factory=list)


def summarise_scores(prompts: Sequence[Prompt], scores: Sequence[Any]) -> tuple[dict[str, float], dict[str, dict[str, float]]]:
    """Means of each axis and the well-formed share, over all rows and per `prompt.meta['kind']`."""
    groups: dict[str, list[Any]] = defaultdict(list)
    for prompt, score in zip(prompts, scores, strict=True):
        groups["all"].append(score)
        groups[str(prompt.meta.get("kind", "unknown"))].append(score)

    def mean(rows: list[Any]) -> dict[str, float]:
        out = {axis: sum(float(getattr(s, axis)) for s in rows) / len(rows) for axis in AXES}
        out["well_formed"] = sum(bool(s.well_formed) for s in rows) / len(rows)
        out["n"] = float(len(rows))
        return out

    means = mean(groups.pop("all")) if scores else {}
    return means, {kind: mean(rows) for kind, rows in sorted(groups.items())}


def evaluate_policy(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    prompts: Sequence[Prompt],
    judge: Callable[[list[dict[str, str]], str], Any],
    gen: GenConfig,
    *,
    seed: int = 0,
) -> PolicyEval:
    """Generate one response per prompt and score each with `judge`."""
    encoded = [encode_prompt(p.messages, tokenizer) for p in prompts]
    rollout = generate(model, tokenizer, encoded, gen, seed=seed)
    responses = decode_responses(rollout, tokenizer)
    scores = [judge(prompts[int(i)].messages, r) for i, r in zip(rollout.prompt_index, responses, strict=True)]
    chosen_prompts = [prompts[int(i)] for i in rollout.prompt_index]
    means, by_kind = summarise_scores(chosen_prompts, scores)
    return PolicyEval(means, by_kind, list(zip(chosen_prompts, responses, scores, strict=True)))


# ----------------------------------------------------------------------------------------------
# Reward models


def calibration_error(chosen: torch.Tensor, rejected: torch.Tensor, n_bins: int = 10) -> float:
    """Expected calibration error of P(chosen > rejected) = sigmoid(r_c - r_r): (N,), (N,) -> float.

    Each pair is counted in both orders ((p, 1) and (1 - p, 0)), so a model that is right but
    overconfident and one that is unsure are told apart; bins are equal-width on [0, 1].
    """
    p = torch.sigmoid((chosen - rejected).double())
    probs = torch.cat([p, 1 - p])  # (2N,)
    labels = torch.cat([torch.ones_like(p), torch.zeros_like(p)])  # (2N,)
    bins = torch.clamp((probs * n_bins).long(), max=n_bins - 1)
    ece = torch.zeros((), dtype=torch.float64)
    for b in range(n_bins):
        in_bin = bins == b
        if in_bin.any():
            ece += in_bin.double().mean() * (probs[in_bin].mean() - labels[in_bin].mean()).abs()
    return float(ece)


def pearson(x: torch.Tensor, y: torch.Tensor) -> float:
    """Pearson correlation of two 1-D tensors (nan when either is constant)."""
    x, y = x.double() - x.double().mean(), y.double() - y.double().mean()
    denom = (x.norm() * y.norm()).item()
    return float((x @ y).item() / denom) if denom > 0 else float("nan")


def preference_disagreement(chosen: torch.Tensor, rejected: torch.Tensor) -> torch.Tensor:
    """Ensemble uncertainty of each pair: std over heads of P_k(chosen > rejected) = sigmoid(r_c,k - r_r,k):
    (N, K), (N, K) -> (N,), zeros for one head. On the probability scale, heads that agree a pair is
    clear give ~0 however far apart their rewards are; a pair worth labelling shows as disagreement."""
    if chosen.shape[1] < 2:
        return torch.zeros(chosen.shape[0], dtype=torch.float64)
    return torch.sigmoid((chosen - rejected).double()).std(1)


def reward_report(
    pairs: Sequence[Any],
    chosen: torch.Tensor,
    rejected: torch.Tensor,
    judge: Callable[[list[dict[str, str]], str], Any] | None = None,
) -> dict[str, float]:
    """Pairwise accuracy (overall and by `meta['kind']`), calibration, reward distribution, length
    correlation, ensemble uncertainty and, with a gold `judge`, agreement with it: (N,K), (N,K) scores."""
    mean_c, mean_r = chosen.mean(1), rejected.mean(1)
    correct = (mean_c > mean_r).double()
    rewards = torch.cat([mean_c, mean_r]).double()
    lengths = torch.tensor([len(t.split()) for t in [p.chosen for p in pairs] + [p.rejected for p in pairs]], dtype=torch.float64)
    report = {
        "rm/accuracy": float(correct.mean()),
        "rm/ece": calibration_error(mean_c, mean_r),
        "rm/reward_mean": float(rewards.mean()),
        "rm/reward_std": float(rewards.std()),
        "rm/reward_p05": float(rewards.quantile(0.05)),
        "rm/reward_p95": float(rewards.quantile(0.95)),
        "rm/length_corr": pearson(rewards, lengths),
        "rm/uncertainty": float(preference_disagreement(chosen, rejected).mean()),
    }
    kinds = sorted({str(p.meta.get("kind")) for p in pairs if "kind" in p.meta})
    for kind in kinds:
        rows = torch.tensor([str(p.meta.get("kind")) == kind for p in pairs])
        report[f"rm/accuracy/{kind}"] = float(correct[rows].mean())
    if judge is not None:
        gold_c = torch.tensor([judge(p.prompt, p.chosen).overall for p in pairs], dtype=torch.float64)
        gold_r = torch.tensor([judge(p.prompt, p.rejected).overall for p in pairs], dtype=torch.float64)
        decided = gold_c != gold_r
        agree = ((mean_c > mean_r) == (gold_c > gold_r)) & decided
        report["gold/agreement"] = float(agree.sum() / decided.sum().clamp(min=1))
        report["gold/length_corr"] = pearson(torch.cat([gold_c, gold_r]), lengths)
        gap = (gold_c - gold_r).abs()
        uncertainty = preference_disagreement(chosen, rejected)
        for name, rows in (("close", decided & (gap <= CLOSE_GAP)), ("clear", gap >= CLEAR_GAP)):
            report[f"gold/pairs_{name}"] = float(rows.sum())
            if rows.any():
                report[f"gold/agreement_{name}"] = float(agree[rows].double().mean())
                report[f"gold/uncertainty_{name}"] = float(uncertainty[rows].mean())
    return report
