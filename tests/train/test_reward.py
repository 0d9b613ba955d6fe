"""Reward model: Bradley-Terry math, last-token scoring under any padding (T5c, T7d), training that
learns (T7j), prompt-level split and overfitting stop (T7i), exact resume after SIGKILL (T1)."""

from __future__ import annotations

import json
import math
import random
import signal
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from trainer_runs import run_subprocess

from alignloop.config import TinyModelConfig, load_config
from alignloop.losses import bradley_terry, reward_centering
from alignloop.models import load_sequence_classifier, save_pretrained, tiny_model, train_tokenizer
from alignloop.rewards import sequence_scores
from alignloop.tensors import last_true_index
from alignloop.train import reward

GOOD = "clear kind right helpful exact".split()
BAD = "rude wrong vague lazy false".split()
TOPIC = "river stone cloud lamp north seven blue green alpha beta".split()


def test_bradley_terry_hand_computed_with_margin_and_gradient():
    chosen = torch.tensor([2.0, 0.0], dtype=torch.float64, requires_grad=True)
    rejected = torch.tensor([1.0, 1.0], dtype=torch.float64, requires_grad=True)
    margin = torch.tensor([0.5, 0.0], dtype=torch.float64)
    loss, stats = bradley_terry(chosen, rejected, margin)
    # pair 1: -log sigmoid(0.5); pair 2: -log sigmoid(-1)
    expected = (math.log(1 + math.exp(-0.5)) + math.log(1 + math.exp(1.0))) / 2
    assert abs(loss.item() - expected) < 1e-12
    assert stats["rm/accuracy"].item() == 0.5
    loss.backward()
    # d/d r_c of -log sigmoid(x) = -(1 - sigmoid(x)) = -sigmoid(-x), divided by N = 2
    s = lambda x: 1 / (1 + math.exp(-x))  # noqa: E731
    assert torch.allclose(chosen.grad, torch.tensor([-s(-0.5) / 2, -s(1.0) / 2], dtype=torch.float64), atol=1e-12)
    assert torch.allclose(rejected.grad, -chosen.grad, atol=1e-12)


def test_bradley_terry_weights_and_centering():
    chosen, rejected = torch.tensor([1.0, 3.0]), torch.tensor([0.0, 0.0])
    weighted, _ = bradley_terry(chosen, rejected, weights=torch.tensor([1.0, 0.0]))
    assert abs(weighted.item() - math.log(1 + math.exp(-1.0))) < 1e-6
    center, stats = reward_centering(torch.tensor([1.0, -3.0]), coef=0.01)
    assert abs(center.item() - 0.01 * 5.0) < 1e-7 and stats["rm/reward_mean"].item() == -1.0


def test_last_true_index_left_and_right():
    mask = torch.tensor([[1, 1, 1, 0, 0], [0, 0, 1, 1, 1], [1, 1, 1, 1, 1]])
    assert last_true_index(mask).tolist() == [2, 4, 4]


@pytest.fixture(scope="module")
def tiny_rm(tmp_path_factory):
    texts = [" ".join(random.Random(i).choices(GOOD + BAD + TOPIC, k=8)) for i in range(300)]
    tok = train_tokenizer(texts, vocab_size=300)
    folder = save_pretrained(tiny_model(TinyModelConfig(hidden_size=32, intermediate_size=64, num_layers=2, num_heads=2,
                                                        max_position_embeddings=64), tok, seed=0), tok,
                             tmp_path_factory.mktemp("rm") / "backbone")
    return folder, tok


@pytest.mark.parametrize("pad_is_eos", [False, True])
def test_T5c_T7d_score_alone_batched_left_right_padding(tiny_rm, pad_is_eos):
    folder, tok = tiny_rm
    from alignloop.models import load_sequence_classifier

    torch.manual_seed(0)
    model = load_sequence_classifier(str(folder), num_labels=2).eval()
    pad = tok.eos_token_id if pad_is_eos else tok.pad_token_id
    seqs = [tok.encode(t) + [tok.eos_token_id] for t in ("river stone", "clear kind right helpful exact lamp north", "blue")]
    alone = torch.cat([sequence_scores(model, torch.tensor([s]), torch.ones(1, len(s), dtype=torch.long)) for s in seqs])
    width = max(map(len, seqs))
    for side in ("right", "left"):
        ids = torch.full((3, width), pad)
        mask = torch.zeros((3, width), dtype=torch.long)
        for i, s in enumerate(seqs):
            cols = slice(0, len(s)) if side == "right" else slice(width - len(s), width)
            ids[i, cols], mask[i, cols] = torch.tensor(s), 1
        expected_index = [len(s) - 1 for s in seqs] if side == "right" else [width - 1] * 3
        assert last_true_index(mask).tolist() == expected_index
        with torch.no_grad():
            batched = sequence_scores(model, ids, mask)
        assert (batched - alone).abs().max().item() <= 1e-5, side


def write_pairs(path: Path, n_prompts: int, seed: int, ranking_every: int = 0) -> None:
    """Pairs whose chosen response uses GOOD words and rejected BAD words, about random topics."""
    rng = random.Random(seed)
    rows = []
    for i in range(n_prompts):
        prompt = " ".join(rng.choices(TOPIC, k=rng.randint(2, 5)))
        good = " ".join(rng.choices(TOPIC + GOOD, k=rng.randint(2, 6)) + [rng.choice(GOOD)])
        bad = " ".join(rng.choices(TOPIC + BAD, k=rng.randint(2, 6)) + [rng.choice(BAD)])
        rows.append({"id": f"p{i}", "prompt": prompt, "chosen": good, "rejected": bad, "strength": "better",
                     "margin": 1.0, "meta": {"prompt_id": f"q{i}"}})
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def rm_overrides(folder: Path, data: Path, out: Path, **extra: object) -> list[str]:
    base = {"model.name_or_path": str(folder), "data.train_path": str(data), "data.eval_share": 0.2,
            "batch.micro_batch_size": 8, "batch.max_steps": 50, "optim.lr": 3e-3, "optim.warmup_steps": 5,
            "run.output_dir": str(out), "run.log_every": 1, "run.eval_every": 25, "run.save_every": 10,
            "run.progress_bar": False, "run.tensorboard": False, "max_overfit_gap": 1.0}
    base.update(extra)
    return [x for k, v in base.items() for x in (f"--{k}", str(v))]


@pytest.fixture(scope="module")
def pairs_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("pairs") / "pairs.jsonl"
    write_pairs(path, 300, seed=0)
    return path


@pytest.fixture(scope="module")
def rm_run(tiny_rm, pairs_file, tmp_path_factory):
    folder, _ = tiny_rm
    out = tmp_path_factory.mktemp("rmrun") / "run"
    proc = run_subprocess(rm_overrides(folder, pairs_file, out, ensemble_size=3), cmd="reward")
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out


def test_reward_model_learns_and_saves_everything(rm_run, tiny_rm):
    out = rm_run
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    evals = [r["eval/rm_accuracy"] for r in rows if "eval/rm_accuracy" in r]
    assert evals[-1] >= 0.9, evals
    assert rows[0]["data/eval_pairs"] > 0 and rows[0]["data/train_pairs"] + rows[0]["data/eval_pairs"] == 300
    stats = json.loads((out / "final" / "reward_stats.json").read_text())
    assert stats["ensemble_size"] == 3 and stats["std"] > 0 and math.isfinite(stats["mean"])
    # T7j: every trainable tensor changed (the backbone and the new 3-head score layer)
    folder, _ = tiny_rm
    init = load_file(str(folder / "model.safetensors"))
    final = load_file(str(out / "final" / "model.safetensors"))
    assert final["score.weight"].shape[0] == 3
    for name, tensor in init.items():
        if name in final and name != "lm_head.weight":
            assert not torch.equal(tensor, final[name]), f"{name} did not change"


def test_ensemble_heads_differ(rm_run):
    final = load_file(str(rm_run / "final" / "model.safetensors"))
    heads = final["score.weight"]
    assert not torch.allclose(heads[0], heads[1]) and not torch.allclose(heads[1], heads[2])


def test_T7i_split_by_prompt_and_overfit_stop(tiny_rm, pairs_file, tmp_path):
    from alignloop.data import load_records

    pairs = load_records(str(pairs_file), "pair")
    train, held = reward.split_by_prompt(pairs, 0.2, seed=0)
    assert {reward.prompt_key(p) for p in train}.isdisjoint({reward.prompt_key(p) for p in held})
    assert 0.1 < len(held) / len(pairs) < 0.3
    folder, _ = tiny_rm
    cfg = load_config(reward.RewardConfig, None, rm_overrides(folder, pairs_file, tmp_path / "r", max_overfit_gap=-1.0,
                                                              **{"run.save_every": 0}))
    result = reward.train(cfg)
    assert result.stopped_early and result.steps == 25


def test_T7i_leak_between_explicit_files_is_an_error(tiny_rm, pairs_file, tmp_path):
    folder, _ = tiny_rm
    cfg = load_config(reward.RewardConfig, None, rm_overrides(folder, pairs_file, tmp_path / "r",
                                                              **{"data.eval_path": str(pairs_file)}))
    with pytest.raises(ValueError, match="both the training and held-out"):
        reward.train(cfg)
    assert not (tmp_path / "r").exists()


def test_rankings_become_weighted_groups(tiny_rm, tmp_path):
    rows = [{"id": f"r{i}", "prompt": "river stone", "responses": ["clear kind", "lamp north", "rude wrong"],
             "meta": {"prompt_id": f"q{i}"}} for i in range(40)]
    path = tmp_path / "rank.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    folder, tok = tiny_rm
    cfg = load_config(reward.RewardConfig, None, rm_overrides(folder, path, tmp_path / "r", **{"data.kind": "ranking"}))
    pairs, _ = reward.load_comparisons(cfg)
    tokenized, dropped = reward.tokenize_pairs(pairs, tok, cfg, seed=0)
    assert dropped == 0 and len(tokenized) == 3 * len({reward.prompt_key(p) for p in pairs})
    assert all(abs(p.weights[0] - 1 / 3) < 1e-9 for p in tokenized)
    batches = reward._epoch_batches(tokenized, 6, seed=0, epoch=0)
    seen = [i for b in batches for i in b]
    assert len(seen) == len(set(seen)) == len(tokenized) // 6 * 6, "every pair at most once, only the last partial batch dropped"
    for batch in batches:  # with 6 = 2 x 3 pairs per batch, a ranking's pairs share one batch
        keys = [tokenized[i].prompt_key for i in batch]
        assert keys[:3] == [keys[0]] * 3 and keys[3:] == [keys[3]] * 3 and keys[0] != keys[3]
    assert batches == reward._epoch_batches(tokenized, 6, seed=0, epoch=0) != reward._epoch_batches(tokenized, 6, seed=0, epoch=1)


def test_epoch_batches_cut_padding_and_drop_only_the_last_partial_batch():
    rng = random.Random(0)
    pairs = [reward.TokenizedPair(f"p{i}", f"q{i}", [1] * rng.randint(5, 80), [1] * rng.randint(5, 20), 0.0, [1.0])
             for i in range(1000)]
    width = lambda batches: sum(max(max(len(pairs[i].chosen_ids), len(pairs[i].rejected_ids)) for i in b)  # noqa: E731
                                for b in batches) / len(batches)
    bucketed = reward._epoch_batches(pairs, 32, seed=3, epoch=0)
    unsorted = reward._epoch_batches(pairs, 32, seed=3, epoch=0, window_batches=0)
    assert len(bucketed) == len(unsorted) == 1000 // 32 and all(len(b) == 32 for b in bucketed)
    assert len({i for b in bucketed for i in b}) == 32 * 31
    assert width(bucketed) < 0.6 * width(unsorted)


def test_T1_reward_sigkill_resumes_exactly(tiny_rm, pairs_file, rm_run, tmp_path):
    folder, _ = tiny_rm
    ref, out = tmp_path / "ref", tmp_path / "run"
    args = lambda o: rm_overrides(folder, pairs_file, o)  # noqa: E731
    assert run_subprocess(args(ref), cmd="reward").returncode == 0
    killed = run_subprocess(args(out), {"ALIGNLOOP_TEST_KILL_AT": "37"}, cmd="reward")
    assert killed.returncode == -signal.SIGKILL
    assert run_subprocess(args(out), cmd="reward").returncode == 0
    la, lb = _rm_losses(ref), _rm_losses(out)
    assert sorted(la) == list(range(1, 51)) and la == lb
    pa, pb = load_file(str(ref / "final" / "model.safetensors")), load_file(str(out / "final" / "model.safetensors"))
    assert all(torch.equal(pa[k], pb[k]) for k in pa)


def _rm_losses(run_dir: Path) -> dict[int, float]:
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["rm/loss"] for r in rows if "rm/loss" in r}


@pytest.mark.parametrize("wrapper", ["none", "lora"])
def test_shared_prompt_rows_give_the_scores_and_gradients_of_separate_rows(tiny_rm, wrapper):
    """One row per pair (prompt once) is exact for a causal decoder: same scores, same loss gradient; also
    through a PEFT LoRA wrapper (adapters active)."""
    from alignloop.config import LoRAConfig
    from alignloop.rewards import has_decoder_backbone, shared_prefix_pair_scores
    from alignloop.tensors import pack_shared_prefix

    folder, tok = tiny_rm
    torch.manual_seed(0)
    lora = LoRAConfig(r=4, alpha=8, target_modules=["q_proj", "v_proj", "up_proj"]) if wrapper == "lora" else None
    model = load_sequence_classifier(str(folder), num_labels=2, lora=lora)
    if wrapper == "lora":  # make the adapters matter (B starts at zero)
        with torch.no_grad():
            for name, p in model.named_parameters():
                if "lora_B" in name:
                    p.normal_(0, 0.5)
    assert has_decoder_backbone(model)
    gen = torch.Generator().manual_seed(0)
    prompts = [torch.randint(3, 290, (n,), generator=gen).tolist() for n in (5, 9, 3)]
    pairs = [(p + torch.randint(3, 290, (a,), generator=gen).tolist(), p + torch.randint(3, 290, (b,), generator=gen).tolist())
             for p, a, b in zip(prompts, (4, 2, 6), (3, 5, 1), strict=True)]
    rows = [s for pair in pairs for s in pair]
    width = max(len(r) for r in rows)
    ids = torch.tensor([r + [tok.pad_token_id] * (width - len(r)) for r in rows])
    mask = torch.tensor([[1] * len(r) + [0] * (width - len(r)) for r in rows])
    separate = sequence_scores(model, ids, mask)  # (6, 2): chosen, rejected interleaved
    if wrapper == "lora":  # the model's own forward (HF pooling at the last non-pad token) agrees: adapters on
        own = model(input_ids=ids, attention_mask=mask).logits
        assert torch.allclose(separate, own, atol=1e-5)
        with model.disable_adapter():
            assert not torch.allclose(sequence_scores(model, ids, mask), separate, atol=1e-3)
    chosen, rejected = shared_prefix_pair_scores(model, pack_shared_prefix(pairs, tok.pad_token_id))
    assert torch.allclose(chosen, separate[0::2], atol=1e-5) and torch.allclose(rejected, separate[1::2], atol=1e-5)
    params = [p for p in model.parameters() if p.requires_grad]
    g_shared = torch.autograd.grad((chosen - rejected).sum(), params)
    g_separate = torch.autograd.grad((separate[0::2] - separate[1::2]).sum(), params, allow_unused=True)
    for a, b in zip(g_shared, g_separate, strict=True):
        assert torch.allclose(a, b if b is not None else torch.zeros_like(a), atol=1e-5)
