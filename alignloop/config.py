"""Configuration: dataclasses with a docstring per field, YAML overrides, dotted CLI overrides.

A config is built in three layers: the dataclass defaults, then a YAML file (which may only name
fields that exist), then `--section.field value` overrides from the command line. Values are checked
against the field's type annotation; an unknown key or a wrong type raises `ConfigError` naming the
dotted key. Each trainer config has a `resolve()` method that computes derived sizes once; the
resolved config is written to the run directory as `config.yaml`.
"""

from __future__ import annotations

import ast
import dataclasses
import inspect
import os
import textwrap
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, TypeVar

import yaml

T = TypeVar("T")


class ConfigError(ValueError):
    """A config key that does not exist, or a value of the wrong type; the message names the key."""


# ----------------------------------------------------------------------------------------------
# Shared sections


@dataclass
class TinyModelConfig:
    """Shape of a Llama-style model built from scratch (the sandbox default and tests)."""

    hidden_size: int = 256
    """Width of the residual stream."""
    intermediate_size: int = 688
    """Width of the SwiGLU MLP."""
    num_layers: int = 4
    """Number of transformer blocks."""
    num_heads: int = 4
    """Attention heads (key/value heads are the same number)."""
    max_position_embeddings: int = 256
    """Longest sequence the rotary embedding is set up for."""
    attention_dropout: float = 0.0
    """Dropout on attention probabilities (0 keeps training deterministic given the data order)."""
    tie_word_embeddings: bool = True
    """Share the input embedding with the LM head (fewer parameters, as in small Llama configs)."""


@dataclass
class LoRAConfig:
    """Low-rank adapters through `peft`; `r = 0` trains all weights."""

    r: int = 0
    """Adapter rank; 0 disables LoRA."""
    alpha: int = 16
    """Scaling numerator: the update is scaled by alpha / r."""
    dropout: float = 0.0
    """Dropout on the adapter input."""
    target_modules: list[str] = field(default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj"])
    """Module names that receive adapters."""


@dataclass
class ModelConfig:
    """Which model to train and how to hold it."""

    name_or_path: str = ""
    """A Hugging Face hub name or a local folder; empty means build `tiny` from scratch."""
    tokenizer: str = ""
    """Tokenizer name or folder; empty means the model's own (or, for a tiny model, one trained on the data)."""
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    """Weight dtype. bf16 is refused on a CPU without native bf16 support."""
    tiny: TinyModelConfig = field(default_factory=TinyModelConfig)
    """Shape used when `name_or_path` is empty."""
    tokenizer_vocab_size: int = 1024
    """Vocabulary size when a tokenizer is trained on the data (tiny models only)."""
    lora: LoRAConfig = field(default_factory=LoRAConfig)
    """Adapters; off by default."""


@dataclass
class OptimConfig:
    """AdamW with warmup and a decay schedule."""

    lr: float = 2e-3
    """Peak learning rate."""
    weight_decay: float = 0.0
    """Decoupled weight decay (AdamW)."""
    beta1: float = 0.9
    """Adam first-moment decay."""
    beta2: float = 0.95
    """Adam second-moment decay."""
    eps: float = 1e-8
    """Adam epsilon."""
    warmup_steps: int = 20
    """Optimizer steps of linear warmup from 0 to `lr`."""
    schedule: Literal["cosine", "linear", "constant"] = "cosine"
    """Decay after warmup, down to `min_lr_ratio * lr` at the last step."""
    min_lr_ratio: float = 0.1
    """Final learning rate as a fraction of the peak."""
    max_grad_norm: float = 1.0
    """Clip the global gradient norm to this value; 0 disables clipping."""


@dataclass
class BatchConfig:
    """How many examples make one optimizer step, and how long to train."""

    micro_batch_size: int = 32
    """Examples per forward/backward on one process."""
    grad_accum_steps: int = 1
    """Micro-batches accumulated per optimizer step on one process."""
    epochs: float = 1.0
    """Passes over the training data (fractional allowed); ignored when `max_steps` > 0."""
    max_steps: int = 0
    """Optimizer steps to run; 0 derives it from `epochs`."""
    eval_batch_size: int = 64
    """Examples per forward in evaluation."""
    world_size: int = 0
    """Derived: number of processes (from the launcher's WORLD_SIZE)."""
    global_batch_size: int = 0
    """Derived: examples per optimizer step = micro_batch_size * grad_accum_steps * world_size."""

    def resolve(self) -> None:
        """Compute derived sizes once (the launcher's WORLD_SIZE is known before training starts)."""
        self.world_size = int(os.environ.get("WORLD_SIZE", "1"))
        if self.micro_batch_size < 1 or self.grad_accum_steps < 1:
            raise ConfigError("batch.micro_batch_size and batch.grad_accum_steps must be >= 1")
        self.global_batch_size = self.micro_batch_size * self.grad_accum_steps * self.world_size

    def total_steps(self, num_examples: int) -> tuple[int, int]:
        """(steps per epoch, total optimizer steps) for a data set of `num_examples`; the last partial
        global batch of an epoch is dropped so every step sees the same number of examples."""
        steps_per_epoch = num_examples // self.global_batch_size
        if steps_per_epoch == 0:
            raise ConfigError(f"batch.global_batch_size {self.global_batch_size} > {num_examples} training examples")
        return steps_per_epoch, self.max_steps or max(1, int(self.epochs * steps_per_epoch))


@dataclass
class RunConfig:
    """Where a run writes, how it logs, checkpoints and resumes."""

    output_dir: str = "runs/sft"
    """Run directory: config.yaml, metrics.jsonl, tb/, checkpoints/, final/ and manifest.json."""
    seed: int = 0
    """Seed for model init, data order and sampling."""
    deterministic: bool = False
    """Use deterministic algorithms only (slower on GPU; CPU is deterministic already)."""
    mixed_precision: Literal["no", "bf16"] = "no"
    """bf16 autocast with fp32 master weights; refused on a CPU without native bf16. Native is not fast: an
    AVX-512 CPU without AMX ran bf16 products at half its fp32 rate, and every workload slower (docs/benchmarks.md)."""
    log_every: int = 10
    """Optimizer steps between metric lines."""
    eval_every: int = 100
    """Optimizer steps between evaluations (0: only at the end)."""
    save_every: int = 100
    """Optimizer steps between checkpoints (0: never)."""
    keep_checkpoints: int = 2
    """Complete checkpoints kept on disk."""
    resume: Literal["auto", "never", "must"] = "auto"
    """auto: resume from the newest complete checkpoint if one exists; must: fail if none; never: start fresh."""
    progress_bar: bool = True
    """Show a progress bar on stderr."""
    tensorboard: bool = True
    """Write TensorBoard events to <output_dir>/tb."""
    record_sample_ids: bool = False
    """Append each optimizer step's example ids to sample_ids.jsonl (an audit of what data each step saw)."""


# ----------------------------------------------------------------------------------------------
# Loading, overriding, checking


def field_docs(cls: type) -> dict[str, str]:
    """The docstring written under each field of a dataclass (attribute docstrings are not kept at runtime)."""
    docs: dict[str, str] = {}
    for klass in reversed(cls.__mro__):
        if not dataclasses.is_dataclass(klass):
            continue
        tree = ast.parse(textwrap.dedent(inspect.getsource(klass)))
        body = tree.body[0].body  # type: ignore[attr-defined]
        for node, nxt in zip(body, body[1:], strict=False):
            if (
                isinstance(node, ast.AnnAssign)
                and isinstance(node.target, ast.Name)
                and isinstance(nxt, ast.Expr)
                and isinstance(nxt.value, ast.Constant)
                and isinstance(nxt.value.value, str)
            ):
                docs[node.target.id] = " ".join(nxt.value.value.split())
    return docs


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


_YAML_TRUE = ("yes", "on", "true", "y")
_YAML_FALSE = ("no", "off", "false", "n")


def _check_value(key: str, value: Any, tp: Any) -> Any:
    """Return `value` checked against annotation `tp` (ints are accepted for floats); raise ConfigError."""
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if tp is Any:
        return value
    if origin in (typing.Union, types.UnionType):
        for arg in args:
            if arg is type(None) and value is None:
                return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _check_value(key, value, arg)
            except ConfigError as err:
                errors.append(str(err))
        raise ConfigError(f"{key}: expected {_type_name(tp)}, got {value!r}")
    if origin is Literal:
        if isinstance(value, bool):  # YAML 1.1 reads `no` / `off` as False: take the choice that was spelled
            spelled = [a for a in args if isinstance(a, str) and a.lower() in (_YAML_TRUE if value else _YAML_FALSE)]
            value = spelled[0] if len(spelled) == 1 else value
        if value not in args:
            raise ConfigError(f"{key}: expected one of {list(args)}, got {value!r}")
        return value
    if origin is list:
        if not isinstance(value, list):
            raise ConfigError(f"{key}: expected a list (on the command line as YAML, e.g. '[a, b]'), got {value!r}")
        return [_check_value(f"{key}[{i}]", v, args[0] if args else Any) for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping, got {value!r}")
        return dict(value)
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping of fields, got {value!r}")
        return _build(tp, value, prefix=f"{key}.")
    if tp is float:
        if isinstance(value, str):
            # YAML 1.1 reads "3e-4" (no dot) as a string; accept numeric literals for float fields only.
            try:
                value = float(value)
            except ValueError:
                raise ConfigError(f"{key}: expected a float, got {value!r}") from None
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{key}: expected a float, got {value!r}")
        return float(value)
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{key}: expected an int, got {value!r}")
        return value
    if tp in (str, bool):
        if not isinstance(value, tp):
            raise ConfigError(f"{key}: expected {tp.__name__}, got {value!r}")
        return value
    raise ConfigError(f"{key}: unsupported annotation {tp!r}")


def _build(cls: type[T], values: dict[str, Any], prefix: str = "", base: Any = None) -> T:
    """`base` (default: `cls()`) updated by `values`, recursing into nested dataclasses so that a
    section keeps its owner's defaults (RewardConfig's run.eval_every, not RunConfig's) for the keys
    not given."""
    base = cls() if base is None else base
    hints = typing.get_type_hints(type(base))
    names = {f.name for f in dataclasses.fields(base) if f.init}
    for key in values:
        if key not in names:
            raise ConfigError(f"unknown config key '{prefix}{key}' (known: {', '.join(sorted(names))})")
    kwargs = {}
    for key, value in values.items():
        current = getattr(base, key)
        if dataclasses.is_dataclass(current) and isinstance(value, dict):
            kwargs[key] = _build(type(current), value, f"{prefix}{key}.", current)
        else:
            kwargs[key] = _check_value(prefix + key, value, hints[key])
    return dataclasses.replace(base, **kwargs)


def to_dict(cfg: Any) -> dict[str, Any]:
    """Plain nested dict of a config (for YAML and JSON)."""
    return dataclasses.asdict(cfg)


def _set_dotted(tree: dict[str, Any], dotted: str, value: Any) -> None:
    parts = dotted.split(".")
    node = tree
    for part in parts[:-1]:
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise ConfigError(f"config key '{dotted}': '{part}' is not a section")
        node = child
    node[parts[-1]] = value


def parse_overrides(args: list[str]) -> dict[str, Any]:
    """Turn `["--optim.lr", "3e-4", "--run.seed=1"]` into a nested dict; values are parsed as YAML scalars."""
    tree: dict[str, Any] = {}
    i = 0
    while i < len(args):
        arg = args[i]
        if not arg.startswith("--") or arg == "--":
            raise ConfigError(f"expected an override like --section.key VALUE, got '{arg}'")
        key = arg[2:]
        if "=" in key:
            key, raw = key.split("=", 1)
            i += 1
        else:
            if i + 1 >= len(args):
                raise ConfigError(f"config key '{key}': missing value")
            raw = args[i + 1]
            i += 2
        try:
            value = yaml.safe_load(raw) if raw != "" else ""
        except yaml.YAMLError as err:
            raise ConfigError(f"config key '{key}': cannot parse value {raw!r}: {err}") from err
        _set_dotted(tree, key.replace("-", "_"), value)
    return tree


def _merge(base: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in extra.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _merge(out[key], value)
        else:
            out[key] = value
    return out


def load_config(cls: type[T], yaml_path: str | Path | None = None, overrides: list[str] | None = None) -> T:
    """Defaults of `cls`, updated by a YAML file, then by dotted CLI overrides; checked, then resolved."""
    values: dict[str, Any] = {}
    if yaml_path is not None:
        path = Path(yaml_path)
        try:
            loaded = yaml.safe_load(path.read_text(encoding="utf-8"))
        except (OSError, yaml.YAMLError) as err:
            raise ConfigError(f"{path}: cannot read config: {err}") from err
        if loaded is None:
            loaded = {}
        if not isinstance(loaded, dict):
            raise ConfigError(f"{path}: expected a mapping at the top level")
        values = loaded
    values = _merge(values, parse_overrides(overrides or []))
    cfg = _build(cls, values)
    resolve = getattr(cfg, "resolve", None)
    if callable(resolve):
        resolve()
    return cfg


def save_config(cfg: Any, path: str | Path) -> None:
    """Write the resolved config as YAML (atomically)."""
    from alignloop.files import atomic_write_text

    atomic_write_text(Path(path), yaml.safe_dump(to_dict(cfg), sort_keys=False))


def describe(cls: type, prefix: str = "") -> list[tuple[str, str, str]]:
    """(dotted key, default, doc) for every leaf field: used by `--help`."""
    rows: list[tuple[str, str, str]] = []
    docs = field_docs(cls)
    hints = typing.get_type_hints(cls)
    default = cls()
    for f in dataclasses.fields(cls):
        tp = hints[f.name]
        if dataclasses.is_dataclass(tp):
            rows.extend(describe(tp, prefix=f"{prefix}{f.name}."))
        else:
            rows.append((prefix + f.name, repr(getattr(default, f.name)), docs.get(f.name, "")))
    return rows


@dataclass
class GenConfig:
    """Sampling settings for generation."""

    max_new_tokens: int = 64
    """Most tokens generated per response."""
    temperature: float = 1.0
    """Softmax temperature; 0 means greedy decoding."""
    top_p: float = 1.0
    """Nucleus sampling: keep the smallest set of tokens whose probability reaches top_p."""
    top_k: int = 0
    """Keep only the k most likely tokens (0: no limit)."""
    num_samples: int = 1
    """Responses per prompt."""
    stop_strings: list[str] = field(default_factory=list)
    """Generation of a sequence also ends at any of these strings (EOS always ends it)."""
    batch_size: int = 64
    """Rows (prompts x num_samples) per generation batch."""
    backend: Literal["auto", "transformers"] = "auto"
    """auto: our preallocated-cache forward for Llama-architecture models (`llama_decode`), else the model's own;
    transformers: always the model's own forward with its cache."""
