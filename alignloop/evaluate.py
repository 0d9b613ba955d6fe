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

from transformers import PreTrainedModel, PreTrainedTokenizerBase

from alignloop.config import GenConfig
from alignloop.data import Prompt
from alignloop.generation import decode_responses, generate
from alignloop.tokenization import encode_prompt

AXES = ("helpful", "honest", "harmless", "overall")


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
