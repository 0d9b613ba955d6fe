"""Reward sources. Every source maps (prompts, responses) to one score per response.

One signature, `source(prompts: list[list[Message]], responses: list[str]) -> Tensor (N,)` (float32,
CPU), whatever computes it: a trained reward model, the sandbox's gold judge, a Python function or an
HTTP service. `reward_source(spec)` builds one from a string, so configs name sources as text.

A reward model is a sequence classifier whose score is read at the last real token (so left and
right padding give the same score); an ensemble is one backbone with K heads, whose mean is the
reward and whose spread is its uncertainty.
"""

from __future__ import annotations

import importlib
import json
import logging
import urllib.error
import urllib.request
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Protocol

import torch

from alignloop.tensors import last_true_index, position_ids_from_mask

log = logging.getLogger(__name__)

Message = dict[str, str]


class RewardSourceError(RuntimeError):
    """A reward source cannot be built, or returned something other than one finite score per response."""


class RewardSource(Protocol):
    """Anything that scores responses: (prompts, responses) -> (N,) float32 scores on the CPU."""

    def __call__(self, prompts: Sequence[Sequence[Message]], responses: Sequence[str]) -> torch.Tensor: ...


def _decoder_parts(model: torch.nn.Module) -> tuple[torch.nn.Module, torch.nn.Module] | None:
    """(transformer, score head) of a causal-LM sequence classifier, looking through a PEFT wrapper
    (`get_base_model()`, adapters stay active); None for anything else: an encoder keeps its own pooling,
    and a DDP wrapper must be called itself (its forward arms the gradient all-reduce)."""
    inner = model
    get_base = getattr(inner, "get_base_model", None)
    if callable(get_base):
        inner = get_base()
    if hasattr(inner, "score") and hasattr(inner, "base_model") and inner.base_model is not inner:
        return inner.base_model, inner.score
    return None


def has_decoder_backbone(model: torch.nn.Module) -> bool:
    """Whether `model` is a causal-LM sequence classifier whose backbone and head this module can call apart."""
    return _decoder_parts(model) is not None


def sequence_scores(model: torch.nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """Head outputs at each row's last real token: (B, T) -> (B, K) with K = number of heads.

    Decoder backbones are run with position ids counted over real tokens and read at the last non-pad
    index from the attention mask (never from pad ids: pad may equal EOS, which ends every response).
    Encoders (BERT-like) keep their own pooling and must be fed right-padded input.
    """
    parts = _decoder_parts(model)
    if parts is None:
        return model(input_ids=input_ids, attention_mask=attention_mask).logits  # (B, K)
    backbone, head = parts
    hidden = backbone(
        input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids_from_mask(attention_mask)
    ).last_hidden_state  # (B, T, H)
    last = last_true_index(attention_mask)  # (B,)
    picked = hidden[torch.arange(hidden.shape[0], device=hidden.device), last]  # (B, H)
    return head(picked)  # (B, K)


def shared_prefix_pair_scores(model: torch.nn.Module, packed: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor] | None:
    """Head outputs of both sides of each pair from `tensors.pack_shared_prefix` rows: (B, K) each, or None
    when `model` is not a causal decoder with a score head (an encoder's prompt would see the responses)."""
    parts = _decoder_parts(model)
    if parts is None:
        return None
    backbone, head = parts
    hidden = backbone(input_ids=packed["input_ids"], attention_mask=packed["attention_mask"],
                      position_ids=packed["position_ids"]).last_hidden_state  # (B, T, H)
    rows = torch.arange(hidden.shape[0], device=hidden.device)
    picked = torch.cat([hidden[rows, packed["first_last"]], hidden[rows, packed["second_last"]]])  # (2B, H)
    scores = head(picked)  # (2B, K)
    return scores[: len(rows)], scores[len(rows) :]


def token_scores(model: torch.nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """Head outputs at every position (a critic's values): (B, T) -> (B, T, K), positions counted over real tokens.

    The per-token sibling of `sequence_scores`, for decoder backbones only (an encoder has no causal state).
    """
    parts = _decoder_parts(model)
    if parts is None:
        raise TypeError(f"{type(model).__name__}: per-token scores need a decoder backbone with a `score` head")
    backbone, head = parts
    hidden = backbone(
        input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids_from_mask(attention_mask)
    ).last_hidden_state  # (B, T, H)
    return head(hidden)  # (B, T, K)


# ----------------------------------------------------------------------------------------------
# Sources


def _checked(scores: Any, n: int, name: str) -> torch.Tensor:
    """One finite float per response, as a (N,) float32 CPU tensor, or a RewardSourceError naming the source."""
    try:
        out = torch.as_tensor(scores, dtype=torch.float32).detach().cpu().reshape(-1)
    except (TypeError, ValueError, RuntimeError) as err:
        raise RewardSourceError(f"{name}: scores are not numbers: {err}") from err
    if out.numel() != n:
        raise RewardSourceError(f"{name}: returned {out.numel()} scores for {n} responses")
    if not bool(torch.isfinite(out).all()):
        bad = int((~torch.isfinite(out)).nonzero()[0])
        raise RewardSourceError(f"{name}: score {out[bad].item()} of response {bad} is not finite")
    return out


class RewardModelSource:
    """A trained reward model folder (`alignloop reward`'s final/): mean over its heads of the last-token score.

    Responses are re-tokenised with the reward model's own tokenizer and chat format, as it was trained;
    special-token strings a policy may spell out in plain text are removed first (the chat formatter
    refuses them) and counted in `stripped_special`. With `normalize`, scores become (s - mean) / std
    with the statistics of the folder's `reward_stats.json`.
    """

    def __init__(self, path: str | Path, device: torch.device | str = "cpu", *, normalize: bool = False,
                 batch_size: int = 32, max_length: int | None = None, dtype: str = "float32") -> None:
        from alignloop.models import load_sequence_classifier, load_tokenizer

        self.name = str(path)
        self.device = torch.device(device)
        self.tokenizer = load_tokenizer(self.name)
        self.model: torch.nn.Module = load_sequence_classifier(self.name, dtype)
        self.model.to(self.device).eval().requires_grad_(False)  # type: ignore[arg-type]
        self.batch_size = batch_size
        self.max_length = max_length or getattr(self.model.config, "max_position_embeddings", None)
        self.stats: dict[str, float] | None = None
        if normalize:
            from alignloop.train.reward import load_reward_stats

            self.stats = load_reward_stats(path)
        self.stripped_special = 0
        self.replaced_chars = 0

    def _clean(self, text: str) -> str:
        """A policy may emit anything; the data rules refuse spelled-out special tokens, NUL and lone
        surrogates in text. Score what is left (NUL and surrogates become U+FFFD / '?') and count it."""
        for special in self.tokenizer.all_special_tokens:
            if special and special in text:
                self.stripped_special += 1
                text = text.replace(special, "")
        if "\x00" in text:
            text = text.replace("\x00", "\ufffd")
            self.replaced_chars += 1
        try:
            text.encode("utf-8")
        except UnicodeEncodeError:
            text = text.encode("utf-8", "replace").decode("utf-8")
            self.replaced_chars += 1
        return text

    def _tokens(self, prompt: Sequence[Message], response: str, index: int) -> list[int]:
        """prompt + response + EOS as in reward training; an empty response (which the data rules refuse, but a
        policy may produce) is the generation prompt followed by EOS, the prompt cut from the left if too long."""
        from alignloop.tokenization import encode_prompt, tokenize_conversation

        response = self._clean(response)
        if not response.strip():
            ids = [*encode_prompt(prompt, self.tokenizer), self.tokenizer.eos_token_id]
            return ids[-self.max_length :] if self.max_length else ids
        conv = [*prompt, {"role": "assistant", "content": response}]
        tok = tokenize_conversation(conv, self.tokenizer, self.max_length, "truncate_prompt", example_id=str(index))
        if tok is None:
            raise RewardSourceError(f"{self.name}: response {index} alone is longer than {self.max_length} tokens")
        return tok.input_ids

    @torch.no_grad()
    def __call__(self, prompts: Sequence[Sequence[Message]], responses: Sequence[str]) -> torch.Tensor:
        rows = [self._tokens(p, r, i) for i, (p, r) in enumerate(zip(prompts, responses, strict=True))]
        scores = []
        for start in range(0, len(rows), self.batch_size):
            batch = rows[start : start + self.batch_size]
            width = max(len(r) for r in batch)
            ids = torch.full((len(batch), width), self.tokenizer.pad_token_id, dtype=torch.long)  # (B, T)
            mask = torch.zeros((len(batch), width), dtype=torch.long)  # (B, T)
            for j, r in enumerate(batch):
                ids[j, : len(r)], mask[j, : len(r)] = torch.tensor(r), 1
            heads = sequence_scores(self.model, ids.to(self.device), mask.to(self.device)).float()  # (B, K)
            scores.append(heads.mean(dim=-1).cpu())
        out = torch.cat(scores) if scores else torch.zeros(0)
        if self.stats is not None:
            out = (out - self.stats["mean"]) / max(self.stats["std"], 1e-8)
        return _checked(out, len(responses), self.name)


class FunctionSource:
    """A Python function `fn(prompt_messages, response) -> float`, named "package.module:function"."""

    def __init__(self, target: str) -> None:
        module_name, _, attr = target.partition(":")
        if not module_name or not attr:
            raise RewardSourceError(f"python:{target}: expected 'package.module:function'")
        try:
            fn = getattr(importlib.import_module(module_name), attr)
        except (ImportError, AttributeError) as err:
            raise RewardSourceError(f"python:{target}: cannot import: {err}") from err
        if not callable(fn):
            raise RewardSourceError(f"python:{target}: is not callable")
        self.name = f"python:{target}"
        self.fn: Callable[[Sequence[Message], str], float] = fn

    def __call__(self, prompts: Sequence[Sequence[Message]], responses: Sequence[str]) -> torch.Tensor:
        scores = [self.fn(p, r) for p, r in zip(prompts, responses, strict=True)]
        if not all(isinstance(s, (int, float)) and not isinstance(s, bool) for s in scores):
            raise RewardSourceError(f"{self.name}: must return a float per response, got {scores[:3]!r}...")
        return _checked(scores, len(responses), self.name)


class HTTPSource:
    """A scoring service: POST {"prompts": [[message, ...], ...], "responses": [...]} -> {"scores": [...]}."""

    def __init__(self, url: str, timeout: float = 60.0) -> None:
        self.name = url
        self.url = url
        self.timeout = timeout

    def __call__(self, prompts: Sequence[Sequence[Message]], responses: Sequence[str]) -> torch.Tensor:
        body = json.dumps({"prompts": [list(p) for p in prompts], "responses": list(responses)}).encode()
        request = urllib.request.Request(self.url, data=body, method="POST",
                                         headers={"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(request, timeout=self.timeout) as reply:
                answer = json.loads(reply.read().decode("utf-8"))
        except urllib.error.HTTPError as err:
            raise RewardSourceError(f"{self.url}: HTTP {err.code} {err.reason}") from err
        except (urllib.error.URLError, OSError) as err:
            raise RewardSourceError(f"{self.url}: request failed: {getattr(err, 'reason', err)}") from err
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            raise RewardSourceError(f"{self.url}: reply is not JSON: {err}") from err
        if not isinstance(answer, dict) or not isinstance(answer.get("scores"), list):
            raise RewardSourceError(f"{self.url}: reply must be a JSON object with a 'scores' list")
        return _checked(answer["scores"], len(responses), self.url)


class SandboxJudgeSource:
    """The sandbox world's gold judge (`overall` in [0, 1]): the ground truth the sandbox measures against."""

    def __init__(self, world_dir: str | Path) -> None:
        from alignloop.sandbox import GoldJudge, load_world

        self.name = f"sandbox:{world_dir}"
        try:
            self.judge = GoldJudge(load_world(world_dir))
        except (OSError, ValueError, KeyError) as err:
            raise RewardSourceError(f"{self.name}: cannot load the sandbox world: {err}") from err

    def __call__(self, prompts: Sequence[Sequence[Message]], responses: Sequence[str]) -> torch.Tensor:
        return _checked([s.overall for s in self.judge.score_batch(prompts, responses)], len(responses), self.name)


class RunningScoreNorm:
    """Running mean and variance of raw scores (Chan et al. parallel update), for `(s - mean) / std`.

    Updated with each rollout's scores before they are normalised, so the first rollout is normalised by
    its own statistics; its state is checkpointed so a resumed run normalises exactly as before.
    """

    def __init__(self) -> None:
        self.count, self.mean, self.m2 = 0, 0.0, 0.0

    def update(self, scores: torch.Tensor) -> None:
        x = scores.double()
        n, mean = x.numel(), float(x.mean())
        m2 = float(((x - mean) ** 2).sum())
        total = self.count + n
        delta = mean - self.mean
        self.mean += delta * n / total
        self.m2 += m2 + delta**2 * self.count * n / total
        self.count = total

    @property
    def std(self) -> float:
        return (self.m2 / max(1, self.count - 1)) ** 0.5

    def normalize(self, scores: torch.Tensor) -> torch.Tensor:
        return ((scores.double() - self.mean) / max(self.std, 1e-8)).to(scores.dtype)

    def state_dict(self) -> dict[str, float]:
        return {"count": self.count, "mean": self.mean, "m2": self.m2}

    def load_state_dict(self, state: dict[str, float]) -> None:
        self.count, self.mean, self.m2 = int(state["count"]), float(state["mean"]), float(state["m2"])


def reward_source(spec: str, device: torch.device | str = "cpu", *, normalize: bool = False) -> RewardSource:
    """Build a source from its spec: a reward-model folder, "sandbox:WORLD_DIR", "python:module:function",
    or an "http(s)://" URL. `normalize` (reward models only) applies the folder's reward_stats.json."""
    if spec.startswith(("http://", "https://")):
        source: RewardSource = HTTPSource(spec)
    elif spec.startswith("sandbox:"):
        source = SandboxJudgeSource(spec.removeprefix("sandbox:"))
    elif spec.startswith("python:"):
        source = FunctionSource(spec.removeprefix("python:"))
    elif spec and Path(spec).is_dir():
        return RewardModelSource(spec, device, normalize=normalize)
    else:
        raise RewardSourceError(f"reward source {spec!r}: not a folder, and not sandbox:DIR, python:module:function "
                                "or an http(s):// URL")
    if normalize:
        raise RewardSourceError(f"reward source {spec!r}: saved normalisation needs a reward-model folder "
                                "with reward_stats.json")
    return source
