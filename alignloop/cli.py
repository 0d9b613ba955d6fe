"""Command line: `alignloop <command> [--config FILE.yaml] [--section.key VALUE ...]`.

Every training command takes its dataclass config: defaults, then a YAML file, then dotted
overrides. `alignloop <command> --help` lists every key with its default and meaning.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from alignloop.config import ConfigError, GenConfig, describe, load_config

if TYPE_CHECKING:
    from alignloop.feedback.conversations import Endpoint

log = logging.getLogger("alignloop")


def _config_epilog(cls: type) -> str:
    rows = describe(cls)
    width = max(len(key) for key, _, _ in rows) + 2
    lines = ["config keys (override with --KEY VALUE; defaults in brackets):"]
    for key, default, doc in rows:
        lines.append(f"  {key:<{width}}{doc} [{default}]")
    return "\n".join(lines)


def _add_command(
    sub: argparse._SubParsersAction, name: str, summary: str, config_cls: type | None
) -> argparse.ArgumentParser:
    parser = sub.add_parser(
        name,
        help=summary,
        description=summary,
        epilog=_config_epilog(config_cls) if config_cls else None,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    if config_cls is not None:
        parser.add_argument("--config", type=Path, help="YAML file overriding the defaults")
    return parser


def _fmt_row(label: str, values: dict[str, float]) -> str:
    cells = [f"{100 * values.get(k, float('nan')):6.1f}" for k in ("well_formed", "helpful", "honest", "harmless", "overall")]
    return f"{label:<22}" + "".join(f"{c:>12}" for c in cells)


def _print_eval_table(title: str, columns: list[tuple[str, Any]]) -> None:
    print(f"\n{title}")
    print(f"{'':<22}" + "".join(f"{h:>12}" for h in ("well-formed%", "helpful", "honest", "harmless", "overall")))
    for label, ev in columns:
        print(_fmt_row(label, ev.means))
        for kind, means in ev.by_kind.items():
            print(_fmt_row(f"  {kind} (n={int(means['n'])})", means))


def _short(text: str, width: int = 60) -> str:
    text = " ".join(text.split())
    return text if len(text) <= width else text[: width - 1] + "…"


def cmd_quickstart(args: argparse.Namespace, overrides: list[str]) -> int:
    from alignloop import quickstart

    cfg = load_config(quickstart.QuickstartConfig, args.config, overrides)
    print_quickstart(quickstart.run(cfg), cfg.out_dir)
    return 0


def print_quickstart(result: Any, out_dir: str) -> None:
    """The main job's table of gold scores after each stage and one sample per prompt kind."""
    print(f"\nSFT: {result.sft.steps} steps in {result.sft_seconds:.0f} s, final eval loss {result.sft.final_eval_loss:.3f}")
    print(f"good demonstrations in the SFT data: {100 * result.good_demo_share:.1f}%")
    if result.reward is not None:
        rm = result.reward_report
        print(f"reward model: {result.reward.steps} steps in {result.reward_seconds:.0f} s, held-out agreement with the "
              f"annotators {100 * rm['rm/accuracy']:.1f}%, with the gold judge {100 * rm.get('gold/agreement', float('nan')):.1f}%")
    if result.ppo is not None:
        m = result.ppo.metrics
        print(f"PPO: {result.ppo.steps} steps in {result.ppo_seconds:.0f} s, reward-model score {m.get('ppo/score', float('nan')):+.2f}, "
              f"KL to the SFT model {m.get('ppo/kl', float('nan')):.2f} nats per response")
    rows = [("before SFT, greedy", result.before), ("after SFT, greedy", result.after), ("after SFT, T=1", result.after_sampled)]
    if result.after_ppo is not None:
        rows += [("after PPO, greedy", result.after_ppo), ("after PPO, T=1", result.after_ppo_sampled)]
    _print_eval_table("gold judge on held-out prompts, in %:", rows)
    print("\nsamples at T=1 (gold overall score in brackets):" if result.after_ppo else "\nsamples (gold overall score in brackets):")
    columns = [("before", result.before), ("SFT", result.after_sampled if result.after_ppo else result.after)]
    if result.after_ppo_sampled is not None:
        columns.append(("PPO", result.after_ppo_sampled))
    seen: set[str] = set()
    for i, (prompt, _, _) in enumerate(result.before.rows):
        kind = str(prompt.meta.get("kind"))
        if kind in seen:
            continue
        seen.add(kind)
        print(f"  [{kind}] user: {_short(prompt.messages[-1]['content'], 70)}")
        for name, evaluation in columns:
            _, text, score = evaluation.rows[i]
            print(f"      {name:<6} [{score.overall:.2f}]: {_short(text)}")
    final = result.ppo.final_dir if result.ppo is not None else result.sft.final_dir
    print(f"\nrun directory: {out_dir} (final model: {final})")


def cmd_sft(args: argparse.Namespace, overrides: list[str]) -> int:
    from alignloop.train import sft

    cfg = load_config(sft.SFTConfig, args.config, overrides)
    result = sft.train(cfg)
    if os.environ.get("RANK", "0") == "0":
        print(json.dumps({"run_dir": str(result.run_dir), "final": str(result.final_dir), "steps": result.steps, **result.metrics}))
    return 0


def cmd_reward(args: argparse.Namespace, overrides: list[str]) -> int:
    from alignloop.train import reward

    cfg = load_config(reward.RewardConfig, args.config, overrides)
    result = reward.train(cfg)
    if os.environ.get("RANK", "0") == "0":
        print(json.dumps({"run_dir": str(result.run_dir), "final": str(result.final_dir), "steps": result.steps,
                          "stopped_early": result.stopped_early, **result.metrics}))
    return 0


def cmd_ppo(args: argparse.Namespace, overrides: list[str]) -> int:
    from alignloop.train import ppo

    cfg = load_config(ppo.PPOConfig, args.config, overrides)
    result = ppo.train(cfg)
    print(json.dumps({"run_dir": str(result.run_dir), "final": str(result.final_dir), "critic": str(result.critic_dir),
                      "steps": result.steps, "halted": result.halted, **result.metrics}))
    return 0


def cmd_sandbox(args: argparse.Namespace, overrides: list[str]) -> int:
    from alignloop.sandbox import SandboxConfig, build_world, write_world

    cfg = load_config(SandboxConfig, args.config, overrides)
    world = build_world(cfg)
    paths = write_world(world, args.out)
    if args.prefs_per_prompt > 0:
        from alignloop.sandbox.annotators import write_preference_files

        paths.update(write_preference_files(world, Path(args.out), args.prefs_per_prompt))
    for name, path in paths.items():
        print(f"{name}: {path}")
    return 0


def cmd_reward_eval(args: argparse.Namespace, overrides: list[str]) -> int:
    from alignloop.train.reward import RewardConfig, evaluate_against

    cfg = load_config(RewardConfig, None, ["--data.max_length", str(args.max_length)])
    judge = None
    if args.sandbox_world:
        from alignloop.sandbox import GoldJudge, load_world

        judge = GoldJudge(load_world(args.sandbox_world)).score
    print(json.dumps(evaluate_against(args.model, cfg, judge, str(args.pairs)), indent=2))
    return 0


def cmd_generate(args: argparse.Namespace, overrides: list[str]) -> int:
    from alignloop.data import load_records
    from alignloop.generation import decode_responses, generate
    from alignloop.models import load_causal_lm, load_tokenizer
    from alignloop.tokenization import encode_prompt

    gen = load_config(GenConfig, args.config, overrides)
    if args.prompts_file:
        prompts = [p.messages for p in load_records(str(args.prompts_file), "prompt")]
    elif args.prompt:
        prompts = [[{"role": "user", "content": text}] for text in args.prompt]
    else:
        raise ConfigError("give --prompt TEXT (repeatable) or --prompts-file FILE")
    model = load_causal_lm(str(args.model), dtype=args.dtype)
    tokenizer = load_tokenizer(str(args.model))
    rollout = generate(model, tokenizer, [encode_prompt(p, tokenizer) for p in prompts], gen, seed=args.seed)
    for idx, text in zip(rollout.prompt_index.tolist(), decode_responses(rollout, tokenizer), strict=True):
        print(json.dumps({"prompt": prompts[idx][-1]["content"], "response": text}, ensure_ascii=False))
    return 0


def cmd_serve(args: argparse.Namespace, overrides: list[str]) -> int:
    from alignloop import serve

    if overrides:
        raise ConfigError(f"serve takes no config keys; unknown arguments {overrides}")
    serve.run(args.model, args.host, args.port, args.model_name, os.environ.get(serve.API_KEY_ENV) or None,
              dtype=args.dtype, device=args.device)
    return 0


def build_app_parser() -> argparse.ArgumentParser:
    """`alignloop app ...`: the feedback web app. Kept apart from build_parser so that serving never
    imports the trainers (and torch); settings come from ALIGNLOOP_APP_* variables (docs/feedback.md)."""
    parser = argparse.ArgumentParser(prog="alignloop app", description="The feedback web app (docs/feedback.md).")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="app_command", required=True, metavar="COMMAND")
    p = sub.add_parser("serve", help="Run the web server (migrates the database first).")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--no-migrate", action="store_true", help="do not upgrade the database schema first")
    p = sub.add_parser("migrate", help="Upgrade the database schema (or --down to a revision, 'base' = empty).")
    p.add_argument("--revision", default=None, help="target revision (default: head, or base with --down)")
    p.add_argument("--down", action="store_true", help="downgrade instead of upgrade")
    for name, helptext in (("user", "Users: `user add NAME [--admin]`."), ("token", "API tokens: `token add ADMIN`."),
                           ("project", "Projects: `project add NAME --overlap K`."),
                           ("member", "Project members: `member add PROJECT USER`.")):
        group = sub.add_parser(name, help=helptext).add_subparsers(dest="action", required=True, metavar="ACTION")
        p = group.add_parser("add")
        if name == "user":
            p.add_argument("username")
            p.add_argument("--admin", action="store_true", help="an administrator (the first user should be one)")
            p.add_argument("--password-stdin", action="store_true", help="read the password from stdin (else prompt)")
        elif name == "token":
            p.add_argument("username", help="an admin user")
            p.add_argument("--name", default="cli", help="what the token is for")
        elif name == "project":
            p.add_argument("name")
            p.add_argument("--overlap", type=int, default=1, help="annotators per item (k)")
            p.add_argument("--guidelines-file", type=Path, help="plain-text guidelines shown to annotators")
            p.add_argument("--annotator", action="append", default=[], help="a member (repeatable)")
            p.add_argument("--task", default="pairwise", choices=["pairwise", "rank", "rate", "edit", "chat"],
                           help="what annotators do with each item (docs/feedback.md)")
        else:
            p.add_argument("project")
            p.add_argument("username")
    p = sub.add_parser("model", help="Show a chat project's model, or set it with --url (any OpenAI-compatible "
                                     "server; options left out take their defaults, the API key is kept).")
    p.add_argument("project", help="project name")
    p.add_argument("--url", help="base URL, e.g. http://gpu-box:8001/v1 (a non-public host must also be in "
                                 "ALIGNLOOP_APP_MODEL_HOSTS to be called)")
    p.add_argument("--model", help="the model name the server serves (required with --url)")
    p.add_argument("--drafts", type=int, help="drafts per turn, 1-9 (default 2)")
    p.add_argument("--temperature", type=float, help="default: the server's")
    p.add_argument("--top-p", type=float, help="default: the server's")
    p.add_argument("--max-tokens", type=int, help="default: the server's")
    p.add_argument("--timeout", type=float, help="seconds one request for drafts may take (default 60)")
    key = p.add_mutually_exclusive_group()
    key.add_argument("--api-key-env", metavar="VAR",
                     help="set the API key from this environment variable (never given on the command line)")
    key.add_argument("--clear-api-key", action="store_true", help="remove the stored API key")
    p = sub.add_parser("import", help="Import items (JSON Lines) into a project; all or nothing.")
    p.add_argument("project", help="project name")
    p.add_argument("file", type=Path)
    p = sub.add_parser("export", help="Export labels as training JSONL (the kinds depend on the project's task).")
    p.add_argument("project", help="project name")
    p.add_argument("--kind", choices=["pairs", "annotator-pairs", "votes", "thumbs", "rankings", "annotator-rankings",
                                      "ratings", "annotator-ratings", "edits", "conversations"],
                   help="default: the task's consensus kind (pairs, rankings, ratings; edits for edit projects)")
    p.add_argument("--out", type=Path, required=True)
    p = sub.add_parser("backup", help="Copy the whole database to OUT while it serves, checked before it is kept "
                                      "(SQLite: a .db file, restore by copying it back; PostgreSQL: pg_dump's custom "
                                      "format, restore with pg_restore). Does not migrate.")
    p.add_argument("out", type=Path, help="a new file")
    p = sub.add_parser("dump", help="Write a project whole (settings, items, assignments, every label, chat "
                                    "turns) as JSON Lines for `app load`: it moves projects between databases, "
                                    "and dump -> load -> dump gives the same bytes.")
    p.add_argument("project", help="project name")
    p.add_argument("--out", type=Path, required=True)
    p = sub.add_parser("load", help="Recreate a project from `app dump` output, all or nothing (its name must be "
                                    "free and its users must exist: `app user add`).")
    p.add_argument("file", type=Path)
    return parser


def _read_password(from_stdin: bool) -> str:
    import getpass

    if from_stdin:
        return sys.stdin.readline().rstrip("\n")
    first = getpass.getpass("password (12+ characters): ")
    if getpass.getpass("again: ") != first:
        raise ValueError("the passwords differ")
    return first


def _chat_model(args: argparse.Namespace) -> Endpoint | None:
    """The conversations.Endpoint that `app model --url ...` sets (options left out: its defaults), or
    None to show the current one; ValueError for a missing or contradictory option."""
    from alignloop.feedback.conversations import Endpoint

    options = {"n_drafts": args.drafts, "temperature": args.temperature, "top_p": args.top_p,
               "max_tokens": args.max_tokens, "timeout_s": args.timeout}
    if args.url is None:
        if args.model or args.api_key_env or args.clear_api_key or any(v is not None for v in options.values()):
            raise ValueError("give --url to set the model (without options: show it)")
        return None
    if not args.model:
        raise ValueError("--model is required with --url")
    key = None
    if args.api_key_env:
        key = os.environ.get(args.api_key_env, "")
        if not key:
            raise ValueError(f"--api-key-env: {args.api_key_env} is not set")
    return Endpoint(args.url, args.model, key, **{k: v for k, v in options.items() if v is not None})


def cmd_app(argv: list[str]) -> int:
    """Run one `alignloop app` command; expected failures print one line and return 2."""
    args = build_app_parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    if not args.verbose:  # alembic names each of its autogenerate plugins at INFO on every command: noise
        logging.getLogger("alembic.runtime.plugins").setLevel(logging.WARNING)
    from alignloop.data import DataError
    from alignloop.feedback import commands
    from alignloop.feedback.backup import BackupError
    from alignloop.feedback.services import Conflict, Invalid, NotFound
    from alignloop.feedback.settings import Settings, SettingsError

    settings = Settings.from_env()
    command = args.app_command
    try:
        if command == "serve":
            commands.serve(settings, args.host, args.port, migrate=not args.no_migrate)
        elif command == "migrate":
            revision = args.revision or ("base" if args.down else "head")
            print(f"database at revision {commands.migrate(settings, revision, down=args.down)}")
        elif command == "user":
            commands.add_user(settings, args.username, _read_password(args.password_stdin), args.admin)
            print(f"added {'admin' if args.admin else 'annotator'} {args.username}")
        elif command == "token":
            print(commands.add_token(settings, args.username, args.name))
        elif command == "project":
            guidelines = args.guidelines_file.read_text(encoding="utf-8") if args.guidelines_file else ""
            project_id = commands.add_project(settings, args.name, args.overlap, guidelines, args.annotator, args.task)
            print(f"project {args.name!r} has id {project_id}")
        elif command == "member":
            commands.add_member(settings, args.project, args.username)
            print(f"{args.username} may now label {args.project!r}")
        elif command == "model":
            model = _chat_model(args)
            keep_key = not (args.api_key_env or args.clear_api_key)
            print(json.dumps(commands.show_model(settings, args.project) if model is None
                             else commands.set_model(settings, args.project, model, keep_key)))
        elif command == "import":
            print(f"imported {commands.import_items(settings, args.project, args.file)} items into {args.project!r}")
        elif command == "export":
            report = commands.export_labels(settings, args.project, args.kind, args.out)
            print(json.dumps({"out": str(args.out), **report}))
        elif command == "backup":
            print(json.dumps(commands.backup_database(settings, args.out)))
        elif command == "dump":
            print(json.dumps(commands.dump_project(settings, args.project, args.out)))
        elif command == "load":
            print(json.dumps(commands.load_project(settings, args.file)))
    except (SettingsError, DataError, NotFound, Conflict, Invalid, BackupError, ValueError, OSError) as err:
        print(f"alignloop app {command}: {type(err).__name__}: {err}", file=sys.stderr)
        return 2
    return 0


def build_parser() -> tuple[argparse.ArgumentParser, dict[str, Callable[[argparse.Namespace, list[str]], int]]]:
    from alignloop.quickstart import QuickstartConfig
    from alignloop.sandbox import SandboxConfig
    from alignloop.train.ppo import PPOConfig
    from alignloop.train.reward import RewardConfig
    from alignloop.train.sft import SFTConfig

    parser = argparse.ArgumentParser(prog="alignloop", description="Align language models with human feedback.")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    _add_command(sub, "quickstart", "The main job on the embedded sandbox: world, tokenizer, tiny model, SFT, before/after table.", QuickstartConfig)
    _add_command(sub, "sft", "Supervised fine-tuning on demonstrations (prompt-masked NLL).", SFTConfig)
    _add_command(sub, "reward", "Train a reward model on preference pairs or rankings (Bradley-Terry, optional ensemble).", RewardConfig)
    _add_command(sub, "ppo", "PPO against a reward source (reward model, sandbox gold judge, Python function or HTTP).", PPOConfig)
    p = _add_command(sub, "sandbox", "Build the sandbox world's data files (demonstrations, prompts, facts).", SandboxConfig)
    p.add_argument("--out", type=Path, required=True, help="folder to write the world into")
    p.add_argument("--prefs-per-prompt", type=int, default=0,
                   help="also write prefs_train/prefs_eval.jsonl: this many panel comparisons per prompt")
    p = sub.add_parser("reward-eval", help="Evaluate a reward model on preference pairs (accuracy, calibration, length correlation, gold agreement).")
    p.add_argument("model", type=Path, help="a reward model folder (e.g. runs/reward/final)")
    p.add_argument("--pairs", type=Path, required=True, help="preference pairs (JSONL/JSON/CSV/Parquet)")
    p.add_argument("--sandbox-world", type=Path, help="a sandbox world folder: also report agreement with its gold judge")
    p.add_argument("--max-length", type=int, default=128, help="longest tokenised prompt + response")
    p = _add_command(sub, "generate", "Sample responses from a saved model folder.", GenConfig)
    p.add_argument("model", type=Path, help="a Hugging Face model folder (e.g. runs/quickstart/sft/final)")
    p.add_argument("--prompt", action="append", help="a user message (repeatable)")
    p.add_argument("--prompts-file", type=Path, help="prompt records (JSONL/JSON/CSV/Parquet)")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    p.add_argument("--seed", type=int, default=0, help="sampling seed")
    p = sub.add_parser("serve", help="Serve a model folder through an OpenAI-compatible /v1/chat/completions (docs/serve.md).",
                       description="Serve a model folder through an OpenAI-compatible /v1/chat/completions and /v1/models. "
                       "Set ALIGNLOOP_SERVE_API_KEY to require 'Authorization: Bearer <key>' (docs/serve.md).")
    p.add_argument("model", type=Path, help="a Hugging Face model folder (e.g. runs/quickstart/sft/final)")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on")
    p.add_argument("--port", type=int, default=8001)
    p.add_argument("--model-name", help="the model id clients send and answers carry (default: the folder's name)")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    p.add_argument("--device", default="auto", help="auto (CUDA when available), cpu, cuda, cuda:1, ...")
    sub.add_parser("app", help="The feedback web app: serve, user add, import, export, ... (alignloop app --help).",
                   add_help=False)
    handlers = {"quickstart": cmd_quickstart, "sft": cmd_sft, "reward": cmd_reward, "ppo": cmd_ppo, "reward-eval": cmd_reward_eval, "sandbox": cmd_sandbox, "generate": cmd_generate,
                "serve": cmd_serve}
    return parser, handlers


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["app"]:  # before build_parser, which imports the trainers (torch)
        return cmd_app(argv[1:])
    parser, handlers = build_parser()
    args, overrides = parser.parse_known_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    from alignloop.checkpoint import CheckpointError
    from alignloop.data import DataError
    from alignloop.models import ModelError
    from alignloop.rewards import RewardSourceError
    from alignloop.runtime import NonFiniteError

    try:
        return handlers[args.command](args, overrides)
    except (ConfigError, DataError, ModelError, CheckpointError, NonFiniteError, RewardSourceError) as err:
        # Expected failures get one clear line (file, line, field or key), not a traceback.
        print(f"alignloop {args.command}: {type(err).__name__}: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
