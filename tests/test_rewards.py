"""Reward sources behind one signature: reward model (ensemble mean, saved normalisation), Python function,
HTTP service, sandbox gold judge; the spec parser; running score statistics; per-token critic scores."""

from __future__ import annotations

import json
import math
import threading
from http.server import BaseHTTPRequestHandler, HTTPServer

import pytest
import torch

from alignloop.config import TinyModelConfig
from alignloop.models import load_sequence_classifier, save_pretrained, tiny_model, train_tokenizer
from alignloop.rewards import (
    FunctionSource,
    HTTPSource,
    RewardModelSource,
    RewardSourceError,
    RunningScoreNorm,
    SandboxJudgeSource,
    reward_source,
    sequence_scores,
    token_scores,
)
from alignloop.tokenization import tokenize_conversation

PROMPTS = [[{"role": "user", "content": "river stone"}], [{"role": "user", "content": "blue lamp north"}],
           [{"role": "user", "content": "seven"}]]
RESPONSES = ["clear kind", "river river river blue", "a"]


def word_count(prompt: list[dict[str, str]], response: str) -> float:
    """A rule reward used through `python:test_rewards:word_count`."""
    return float(len(response.split()))


def not_a_float(prompt: list[dict[str, str]], response: str) -> str:
    return "high"


def nan_reward(prompt: list[dict[str, str]], response: str) -> float:
    return math.nan


@pytest.fixture(scope="module")
def rm_folder(tmp_path_factory):
    """A tiny 2-head reward model (random heads) saved like `alignloop reward` saves one."""
    texts = ["river stone blue lamp north seven clear kind a " * 3] * 20
    tok = train_tokenizer(texts, vocab_size=300)
    cfg = TinyModelConfig(hidden_size=32, intermediate_size=64, num_layers=2, num_heads=2, max_position_embeddings=64)
    root = tmp_path_factory.mktemp("rm")
    save_pretrained(tiny_model(cfg, tok, seed=0), tok, root / "backbone")
    torch.manual_seed(0)
    rm = load_sequence_classifier(str(root / "backbone"), num_labels=2)
    rm.config.pad_token_id = tok.pad_token_id
    folder = save_pretrained(rm, tok, root / "rm")
    (folder / "reward_stats.json").write_text(json.dumps({"mean": 0.5, "std": 2.0, "count": 10, "ensemble_size": 2}))
    return folder


def test_reward_model_source_is_the_head_mean_of_last_token_scores(rm_folder):
    source = reward_source(str(rm_folder))
    assert isinstance(source, RewardModelSource)
    scores = source(PROMPTS, RESPONSES)
    assert scores.shape == (3,) and scores.dtype == torch.float32
    model = load_sequence_classifier(str(rm_folder), num_labels=2).eval()
    for i, (p, r) in enumerate(zip(PROMPTS, RESPONSES, strict=True)):
        ids = tokenize_conversation([*p, {"role": "assistant", "content": r}], source.tokenizer).input_ids
        with torch.no_grad():
            heads = sequence_scores(model, torch.tensor([ids]), torch.ones(1, len(ids), dtype=torch.long))
        assert heads.shape == (1, 2)
        assert abs(heads.mean().item() - scores[i].item()) < 1e-5
    # batching does not change a score
    small = RewardModelSource(rm_folder, batch_size=1)(PROMPTS, RESPONSES)
    assert torch.allclose(small, scores, atol=1e-5)


def test_reward_model_source_saved_normalisation(rm_folder):
    raw = reward_source(str(rm_folder))(PROMPTS, RESPONSES)
    normalised = reward_source(str(rm_folder), normalize=True)(PROMPTS, RESPONSES)
    assert torch.allclose(normalised, (raw - 0.5) / 2.0, atol=1e-6)


def test_reward_model_source_strips_spelled_out_special_tokens(rm_folder):
    source = RewardModelSource(rm_folder)
    spelled = source([PROMPTS[0]], ["clear<|eos|> kind"])
    assert source.stripped_special == 1
    assert torch.allclose(spelled, source([PROMPTS[0]], ["clear kind"]), atol=1e-6)


def test_reward_model_source_scores_nul_and_lone_surrogates_instead_of_failing(rm_folder):
    """A sampled policy emitted a NUL byte and the data rules' D108 stopped a PPO run: a reward source is total."""
    source = RewardModelSource(rm_folder)
    scores = source([PROMPTS[0]] * 3, ["clear\x00 kind", "clear \ud800kind", "clear kind"])
    assert source.replaced_chars == 2 and torch.isfinite(scores).all()
    assert torch.allclose(scores[0], source([PROMPTS[0]], ["clear\ufffd kind"])[0], atol=1e-6)


def test_function_source_and_its_errors():
    source = reward_source("python:test_rewards:word_count")
    assert isinstance(source, FunctionSource)
    assert source(PROMPTS, RESPONSES).tolist() == [2.0, 4.0, 1.0]
    with pytest.raises(RewardSourceError, match="must return a float"):
        FunctionSource("test_rewards:not_a_float")(PROMPTS, RESPONSES)
    with pytest.raises(RewardSourceError, match="not finite"):
        FunctionSource("test_rewards:nan_reward")(PROMPTS, RESPONSES)
    with pytest.raises(RewardSourceError, match="cannot import"):
        FunctionSource("no_such_module_xyz:f")
    with pytest.raises(RewardSourceError, match="package.module:function"):
        FunctionSource("test_rewards")


class _Scorer(BaseHTTPRequestHandler):
    def do_POST(self) -> None:  # noqa: N802 (http.server's name)
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        if self.path == "/fail":
            self.send_response(500)
            self.end_headers()
            return
        scores = [len(r) + len(p) for p, r in zip(body["prompts"], body["responses"], strict=True)]
        reply = {"scores": scores[:-1] if self.path == "/short" else scores}
        data = json.dumps(reply).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture
def server():
    httpd = HTTPServer(("127.0.0.1", 0), _Scorer)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}"
    httpd.shutdown()
    httpd.server_close()


def test_http_source_posts_prompts_and_responses(server):
    source = reward_source(server + "/score")
    assert isinstance(source, HTTPSource)
    assert source(PROMPTS, RESPONSES).tolist() == [len(r) + 1.0 for r in RESPONSES]


@pytest.mark.parametrize("path, match", [("/fail", "HTTP 500"), ("/short", "2 scores for 3 responses")])
def test_http_source_errors_name_the_url(server, path, match):
    with pytest.raises(RewardSourceError, match=match) as err:
        HTTPSource(server + path)(PROMPTS, RESPONSES)
    assert server + path in str(err.value)


def test_http_source_unreachable_names_the_url():
    with HTTPServer(("127.0.0.1", 0), _Scorer) as probe:
        port = probe.server_address[1]  # a port that is closed once the probe server is gone
    url = f"http://127.0.0.1:{port}/score"
    with pytest.raises(RewardSourceError, match="request failed") as err:
        HTTPSource(url, timeout=5)(PROMPTS, RESPONSES)
    assert url in str(err.value)


def test_sandbox_source_is_the_gold_judge(tmp_path):
    from alignloop.sandbox import GoldJudge, SandboxConfig, build_world, write_world

    world = build_world(SandboxConfig(n_known=12, n_unknown=10, n_sft_train=800, n_train_prompts=50, n_eval_prompts=20))
    write_world(world, tmp_path / "world")
    source = reward_source(f"sandbox:{tmp_path / 'world'}")
    assert isinstance(source, SandboxJudgeSource)
    prompts = [p.messages for p in world.prompts_eval[:5]]
    responses = ["I do not know.", "Yes.", "It is 4.", "", "blue"]
    judge = GoldJudge(world)
    assert source(prompts, responses).tolist() == pytest.approx([judge.score(p, r).overall for p, r in zip(prompts, responses, strict=True)])
    with pytest.raises(RewardSourceError, match="cannot load the sandbox world"):
        reward_source(f"sandbox:{tmp_path / 'missing'}")


@pytest.mark.parametrize("spec", ["", "no/such/folder", "ftp://x"])
def test_unknown_spec_is_a_clear_error(spec):
    with pytest.raises(RewardSourceError, match="not a folder"):
        reward_source(spec)


def test_saved_normalisation_needs_a_reward_model():
    with pytest.raises(RewardSourceError, match="reward_stats.json"):
        reward_source("python:test_rewards:word_count", normalize=True)


def test_running_score_norm_matches_the_batch_statistics_and_round_trips():
    gen = torch.Generator().manual_seed(0)
    parts = [torch.randn(n, generator=gen) * 3 + 1 for n in (5, 17, 8)]
    norm = RunningScoreNorm()
    for part in parts:
        norm.update(part)
    everything = torch.cat(parts).double()
    assert abs(norm.mean - everything.mean().item()) < 1e-12
    assert abs(norm.std - everything.std().item()) < 1e-12
    copy = RunningScoreNorm()
    copy.load_state_dict(json.loads(json.dumps(norm.state_dict())))
    x = torch.tensor([0.0, 1.0, 4.0])
    assert torch.equal(copy.normalize(x), norm.normalize(x))


def test_token_scores_at_the_last_token_equal_sequence_scores(rm_folder):
    model = load_sequence_classifier(str(rm_folder), num_labels=2).eval()
    ids = torch.tensor([[5, 6, 7, 8], [9, 10, 0, 0]])
    mask = torch.tensor([[1, 1, 1, 1], [1, 1, 0, 0]])
    with torch.no_grad():
        per_token = token_scores(model, ids, mask)  # (B, T, K)
        last = sequence_scores(model, ids, mask)  # (B, K)
    assert per_token.shape == (2, 4, 2)
    assert torch.allclose(per_token[[0, 1], [3, 1]], last, atol=1e-6)
