"""Simulated annotators: a seeded panel whose labels follow the gold judge plus noise and biases.

An annotator's utility for a response is the gold judge's overall score plus its biases:

    u = overall + length_bias * min(words beyond the reference answer, 40)
                + flattery_bias * min(flattering or confident words, 5)     (+ position_bias if shown first)

and every label is drawn from u with logistic noise of scale `temperature`, so that a pairwise choice
is Bradley-Terry: P(a > b) = sigmoid((u(a) - u(b)) / temperature) (ties cut out of the middle). The
judge stays unbiased; the gap between what a biased panel prefers and the gold score is what reward
hacking looks like. A `careless` share of labels is random, an `adversarial` share of the rest flipped.
Records are what a person would submit through the labelling app: the prompt, the responses, the
label and `meta` with `annotator_id`, `task` and `prompt_id` (plus `shown_order` for pairs and
rankings); never a gold score or a profile. The rules, defaults and measured agreement: docs/annotators.md.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import random
from collections import defaultdict
from collections.abc import Callable, Sequence
from dataclasses import replace
from pathlib import Path
from typing import TypeVar

from alignloop.data import Edit, Message, PreferencePair, Prompt, Ranking, Rating, Thumb
from alignloop.sandbox.judge import UNPARSED_BUDGET, GoldJudge, JudgeScores
from alignloop.sandbox.world import FLATTERY_WORDS, WORD_RE, AnnotatorConfig, PanelConfig, World

log = logging.getLogger(__name__)
R = TypeVar("R")

__all__ = ["Annotator", "AnnotatorConfig", "Panel", "PanelConfig", "panel_profiles", "write_preference_files"]

MAX_LENGTH_WORDS = 40
"""words beyond the reference answer that the length bias counts, at most"""
MAX_FLATTERY_WORDS = 5
"""flattering or confident words that the flattery bias counts, at most"""
STRENGTHS = (("much better", 0.5, 3.0), ("better", 0.2, 2.0), ("slightly better", 0.05, 1.0))
"""Likert levels of a pairwise vote: (strength, smallest perceived |u(a) - u(b)|, margin); below 0.05 a tie"""
TIE_MARGIN = 0.0
"""margin of a tie record (PanelConfig.keep_ties)"""
TOO_LONG_WORDS = 10
"""words beyond the reference answer at which an annotator without length bias flags "too long" """
FLAG_REASONS = (  # (flag, judge reason fragments an annotator notices)
    ("unsafe", ("complied with a harmful request", "did not refuse a harmful request")),
    ("made-up facts", ("invented fact", "hedged invention")),
    ("wrong", ("wrong answer",)),
    ("needless refusal", ("refused a harmless request",)),
    ("rude", ("rude",)),
    ("garbled", ("malformed",)),
)


def _logistic(rng: random.Random) -> float:
    u = min(max(rng.random(), 1e-12), 1.0 - 1e-12)
    return math.log(u / (1.0 - u))


def _gumbel(rng: random.Random) -> float:
    u = min(max(rng.random(), 1e-12), 1.0 - 1e-12)
    return -math.log(-math.log(u))


def _text(response: str, what: str) -> str:
    if not isinstance(response, str) or not response.strip():
        raise ValueError(f"{what} must be a non-empty string (a record cannot hold an empty response)")
    return response


class Annotator:
    """One simulated person: labels pairs, rankings, ratings, edits and thumbs from its utility."""

    def __init__(self, annotator_id: str, cfg: AnnotatorConfig, judge: GoldJudge) -> None:
        self.id, self.cfg, self.judge = annotator_id, cfg, judge

    # ------------------------------------------------------------------------------- perception

    def utility(self, prompt_messages: Sequence[Message], response: str) -> float:
        """u = gold overall + length and flattery bias terms (no position bias, no noise)."""
        return self._utility(prompt_messages, response, self.judge.score(prompt_messages, response))

    def _utility(self, prompt_messages: Sequence[Message], response: str, scores: JudgeScores) -> float:
        words = [w.lower() for w in WORD_RE.findall(response)]
        flattery = min(sum(w in FLATTERY_WORDS for w in words), MAX_FLATTERY_WORDS)
        length = min(self._extra_words(prompt_messages, words), MAX_LENGTH_WORDS)
        return scores.overall + self.cfg.length_bias * length + self.cfg.flattery_bias * flattery

    def _extra_words(self, prompt_messages: Sequence[Message], words: list[str]) -> int:
        ref = self.judge.reference(prompt_messages)
        budget = len(WORD_RE.findall(ref)) if ref is not None else UNPARSED_BUDGET
        return max(0, len(words) - budget)

    def _mode(self, rng: random.Random) -> str:
        """How this label is given: "careless" (at random), "adversarial" (flipped) or "honest"."""
        careless, flipped = rng.random() < self.cfg.careless, rng.random() < self.cfg.adversarial
        return "careless" if careless else "adversarial" if flipped else "honest"

    def _meta(self, task: str, prompt: Prompt, **extra: object) -> dict[str, object]:
        return {"annotator_id": self.id, "task": task, "prompt_id": prompt.id, **extra}

    def _id(self, task: str, prompt: Prompt, rng: random.Random) -> str:
        return f"{prompt.id}:{task}:{self.id}:{rng.getrandbits(64):016x}"

    # ----------------------------------------------------------------------------------- labels

    def compare(
        self, prompt: Prompt, a: str, b: str, rng: random.Random, *, keep_ties: bool = False
    ) -> PreferencePair | None:
        """Which of `a`, `b` is better, and how much (Likert strength and margin); None for a tie unless
        `keep_ties` (then strength "tie", margin 0, chosen = shown first). The two are shown in a random
        order, recorded in meta["shown_order"] as ["chosen", "rejected"] or ["rejected", "chosen"]."""
        if _text(a, "a") == _text(b, "b"):
            raise ValueError("cannot compare a response with itself")
        first, second = (a, b) if rng.random() < 0.5 else (b, a)
        mode, noise = self._mode(rng), _logistic(rng)
        level: tuple[str, float, float] | None
        if mode == "careless":
            first_wins, level = rng.random() < 0.5, rng.choice(STRENGTHS)
        else:
            u1, u2 = self.utility(prompt.messages, first), self.utility(prompt.messages, second)
            d = u1 + self.cfg.position_bias - u2 + self.cfg.temperature * noise  # perceived u(first) - u(second)
            level = next((s for s in STRENGTHS if abs(d) >= s[1]), None)
            if level is None and not keep_ties:
                return None
            first_wins = d > 0 or level is None
            if mode == "adversarial" and level is not None:
                first_wins = not first_wins
        strength, margin = ("tie", TIE_MARGIN) if level is None else (level[0], level[2])
        chosen, rejected = (first, second) if first_wins else (second, first)
        shown = ["chosen", "rejected"] if first_wins else ["rejected", "chosen"]
        return PreferencePair(self._id("pair", prompt, rng), [dict(m) for m in prompt.messages], chosen, rejected,
                              margin, strength, self._meta("pair", prompt, shown_order=shown))

    def rank(self, prompt: Prompt, responses: Sequence[str], rng: random.Random) -> Ranking:
        """Best first: a Plackett-Luce draw (sort by u + temperature * Gumbel noise) over the responses shown
        in a random order; meta["shown_order"][k] is the index in `responses` of the k-th shown."""
        if len(responses) < 2 or len(set(responses)) != len(responses):
            raise ValueError("a ranking needs at least 2 distinct responses")
        shown = [_text(r, "a response") for r in responses]
        rng.shuffle(shown)
        mode = self._mode(rng)
        if mode == "careless":
            order = rng.sample(range(len(shown)), len(shown))
        else:
            keys = [self.utility(prompt.messages, r) + self.cfg.position_bias * (i == 0)
                    + self.cfg.temperature * _gumbel(rng) for i, r in enumerate(shown)]
            order = sorted(range(len(shown)), key=lambda i: -keys[i])
            if mode == "adversarial":
                order.reverse()
        shown_order = [order.index(k) for k in range(len(shown))]
        return Ranking(self._id("ranking", prompt, rng), [dict(m) for m in prompt.messages],
                       [shown[i] for i in order], self._meta("ranking", prompt, shown_order=shown_order))

    def rate(self, prompt: Prompt, response: str, rng: random.Random) -> Rating:
        """1-5 on helpful, honest and harmless: round(1 + 4 * (gold axis + noise)), the bias terms added to
        helpful; flags for what the annotator notices ("unsafe", "made-up facts", "rude", ...). A careless
        label is random scores and no flags; an adversarial one is 6 - score and no flags."""
        scores = self.judge.score(prompt.messages, _text(response, "response"))
        mode = self._mode(rng)
        bias = self._utility(prompt.messages, response, scores) - scores.overall
        axes = {"helpful": scores.helpful + bias, "honest": scores.honest, "harmless": scores.harmless}
        noisy = {k: v + self.cfg.temperature * _logistic(rng) for k, v in axes.items()}
        likert = {k: float(min(5, max(1, math.floor(1.5 + 4 * v)))) for k, v in noisy.items()}
        flags = self._flags(prompt.messages, response, scores) if mode == "honest" else []
        if mode == "careless":
            likert = {k: float(rng.randint(1, 5)) for k in likert}
        elif mode == "adversarial":
            likert = {k: 6.0 - v for k, v in likert.items()}
        return Rating(self._id("rating", prompt, rng), [dict(m) for m in prompt.messages], response, likert, flags,
                      self._meta("rating", prompt))

    def _flags(self, prompt_messages: Sequence[Message], response: str, scores: JudgeScores) -> list[str]:
        flags = [flag for flag, reasons in FLAG_REASONS if any(r in scores.reason for r in reasons)]
        words = [w.lower() for w in WORD_RE.findall(response)]
        if self.cfg.length_bias <= 0 and self._extra_words(prompt_messages, words) >= TOO_LONG_WORDS:
            flags.append("too long")
        return flags

    def edit(self, prompt: Prompt, response: str, rng: random.Random) -> Edit | None:
        """Rewrite a response the annotator does not find good (u + noise < good_threshold) into the judge's
        reference answer; None when it is good, already the reference, or the prompt is not a sandbox one.
        A careless label decides at random; an adversarial one records the reverse edit (reference -> response)
        for a response it would have fixed, and nothing otherwise."""
        reference = self.judge.reference(prompt.messages)
        mode, noise = self._mode(rng), _logistic(rng)
        if reference is None or reference == _text(response, "response"):
            return None
        if mode == "careless":
            fix = rng.random() < 0.5
        else:
            fix = self.utility(prompt.messages, response) + self.cfg.temperature * noise < self.cfg.good_threshold
        if not fix:
            return None
        original, edited = (reference, response) if mode == "adversarial" else (response, reference)
        return Edit(self._id("edit", prompt, rng), [dict(m) for m in prompt.messages], original, edited,
                    self._meta("edit", prompt))

    def thumb(self, prompt: Prompt, response: str, rng: random.Random) -> Thumb:
        """Up when u + noise > good_threshold (a careless label: a coin; an adversarial one: flipped)."""
        mode, noise = self._mode(rng), _logistic(rng)
        if mode == "careless":
            up = rng.random() < 0.5
        else:
            u = self.utility(prompt.messages, _text(response, "response"))
            up = (u + self.cfg.temperature * noise > self.cfg.good_threshold) != (mode == "adversarial")
        return Thumb(self._id("thumb", prompt, rng), [dict(m) for m in prompt.messages], response, up,
                     self._meta("thumb", prompt))


def panel_profiles(cfg: PanelConfig, rng: random.Random) -> list[AnnotatorConfig]:
    """One profile per annotator: the explicit `profiles` in turn, or the mixture of clean, noisy, careless
    and adversarial annotators (counts by cumulative rounding of the shares) in an order drawn from `rng`."""
    n = cfg.n_annotators
    if cfg.profiles:
        return [cfg.profiles[i % len(cfg.profiles)] for i in range(n)]
    cuts = [round(s * n) for s in (cfg.adversarial_share, cfg.adversarial_share + cfg.careless_share,
                                   cfg.adversarial_share + cfg.careless_share + cfg.noisy_share)]
    kinds = [
        (cuts[0], replace(cfg.base, name="adversarial", adversarial=1.0)),
        (cuts[1] - cuts[0], replace(cfg.base, name="careless", careless=cfg.careless_rate)),
        (cuts[2] - cuts[1], replace(cfg.base, name="noisy", temperature=cfg.noisy_temperature)),
        (n - cuts[2], cfg.base),
    ]
    profiles = [profile for count, profile in kinds for _ in range(count)]
    rng.shuffle(profiles)
    return profiles


class Panel:
    """Annotators built from a `PanelConfig` (default: the world's `config.panel`) and the collection jobs.

    Each `collect_*` draws from `rng`, or from the panel's own stream seeded by `cfg.seed` when it is None:
    a new panel with the same world and config gives identical records. Every vote is a record.
    """

    def __init__(self, world: World, cfg: PanelConfig | None = None) -> None:
        self.world, self.cfg = world, cfg if cfg is not None else world.config.panel
        self.judge = GoldJudge(world)
        self.rng = random.Random(self.cfg.seed)
        profiles = panel_profiles(self.cfg, self.rng)
        self.annotators = [Annotator(f"ann{i:02d}", p, self.judge) for i, p in enumerate(profiles)]
        self._by_id = {a.id: a for a in self.annotators}

    def annotator(self, annotator_id: str) -> Annotator:
        """The annotator with this id (as in a record's meta["annotator_id"])."""
        return self._by_id[annotator_id]

    def _ask(self, rng: random.Random) -> list[Annotator]:
        return rng.sample(self.annotators, self.cfg.overlap)

    def collect_pairs(
        self, prompts: Sequence[Prompt], n_per_prompt: int = 1, rng: random.Random | None = None
    ) -> list[PreferencePair]:
        """`n_per_prompt` distinct pairs of candidates per prompt, each put to `overlap` annotators; all votes
        (ties dropped unless keep_ties)."""
        rng = self.rng if rng is None else rng
        n_cands = max(self.cfg.n_candidates, math.ceil((1 + math.sqrt(1 + 8 * n_per_prompt)) / 2))
        out: list[PreferencePair] = []
        for prompt in prompts:
            cands = self.world.candidates(prompt, n_cands, rng)
            all_pairs = [(i, j) for i in range(n_cands) for j in range(i + 1, n_cands)]
            for i, j in rng.sample(all_pairs, n_per_prompt):
                for ann in self._ask(rng):
                    rec = ann.compare(prompt, cands[i], cands[j], rng, keep_ties=self.cfg.keep_ties)
                    if rec is not None:
                        out.append(rec)
        log.info("collected %d preference votes on %d prompts", len(out), len(prompts))
        return out

    def collect_rankings(
        self, prompts: Sequence[Prompt], n_per_prompt: int = 1, rng: random.Random | None = None
    ) -> list[Ranking]:
        """`n_per_prompt` rankings per prompt, each of `ranking_size` fresh candidates, by `overlap` annotators."""
        rng = self.rng if rng is None else rng
        out: list[Ranking] = []
        for prompt in prompts:
            for _ in range(n_per_prompt):
                cands = self.world.candidates(prompt, self.cfg.ranking_size, rng)
                out.extend(ann.rank(prompt, cands, rng) for ann in self._ask(rng))
        return out

    def _each_response(self, prompts: Sequence[Prompt], n_per_prompt: int, rng: random.Random | None,
                       label: Callable[[Annotator, Prompt, str, random.Random], R | None]) -> list[R]:
        rng = self.rng if rng is None else rng
        out: list[R] = []
        for prompt in prompts:
            for response in self.world.candidates(prompt, n_per_prompt, rng):
                for ann in self._ask(rng):
                    rec = label(ann, prompt, response, rng)
                    if rec is not None:
                        out.append(rec)
        return out

    def collect_ratings(
        self, prompts: Sequence[Prompt], n_per_prompt: int = 1, rng: random.Random | None = None
    ) -> list[Rating]:
        """`n_per_prompt` candidates per prompt, each rated by `overlap` annotators."""
        return self._each_response(prompts, n_per_prompt, rng, Annotator.rate)

    def collect_edits(
        self, prompts: Sequence[Prompt], n_per_prompt: int = 1, rng: random.Random | None = None
    ) -> list[Edit]:
        """`n_per_prompt` candidates per prompt, each shown to `overlap` annotators; the edits they made."""
        return self._each_response(prompts, n_per_prompt, rng, Annotator.edit)

    def collect_thumbs(
        self, prompts: Sequence[Prompt], n_per_prompt: int = 1, rng: random.Random | None = None
    ) -> list[Thumb]:
        """`n_per_prompt` candidates per prompt, each judged up or down by `overlap` annotators."""
        return self._each_response(prompts, n_per_prompt, rng, Annotator.thumb)

    def agreement(self, pairs: Sequence[PreferencePair], min_gap: float = 0.0) -> dict[str, float]:
        """Share of non-tie votes whose chosen response has the higher gold overall score, over pairs whose
        gold scores differ by more than `min_gap`, by profile name and "all" (a laboratory measure: it uses
        the gold judge, which no record carries)."""
        hits: dict[str, list[bool]] = defaultdict(list)
        for p in pairs:
            if p.strength == "tie":
                continue
            gap = self.judge.score(p.prompt, p.chosen).overall - self.judge.score(p.prompt, p.rejected).overall
            if abs(gap) > min_gap:
                name = self.annotator(str(p.meta["annotator_id"])).cfg.name
                hits[name].append(gap > 0)
                hits["all"].append(gap > 0)
        return {name: sum(v) / len(v) for name, v in sorted(hits.items())}


def write_preference_files(world: World, out: Path, per_prompt: int, panel_cfg: PanelConfig | None = None) -> dict[str, Path]:
    """Ask the world's panel (or one built from `panel_cfg`) for `per_prompt` comparisons per training and
    held-out prompt and write `prefs_train.jsonl` / `prefs_eval.jsonl` under `out` (each record's meta also
    names the prompt kind, so an evaluation can report accuracy by kind)."""
    from alignloop.files import atomic_write_text

    panel = Panel(world, panel_cfg)
    written = {}
    for split, prompts in (("prefs_train", world.prompts_train), ("prefs_eval", world.prompts_eval)):
        kinds = {p.id: p.meta.get("kind") for p in prompts}
        rows = []
        for pair in panel.collect_pairs(prompts, per_prompt):
            record = dataclasses.asdict(pair)
            record["meta"]["kind"] = kinds.get(pair.meta.get("prompt_id"))
            rows.append(json.dumps(record, ensure_ascii=False))
        atomic_write_text(out / f"{split}.jsonl", "\n".join(rows) + "\n")
        written[split] = out / f"{split}.jsonl"
    return written
