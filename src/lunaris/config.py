"""Configuration: dataclasses, YAML loading, `--a.b=c` overrides, and validation.

The YAML format is the original one: model keys under `model:`, training keys at the top level.
Every field carries a one-line `help` (shown in the README's config reference and by `lunaris config`).
Validation collects every problem and raises them together in one `ConfigError`.
"""

import dataclasses
import difflib
import math
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import yaml

from lunaris.errors import ConfigError


def _f(default, help: str):
    """A dataclass field with a one-line description."""
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda: type(default)(default), metadata={"help": help})
    return field(default=default, metadata={"help": help})


COLLAB_MODES = ("mha", "simple", "none")
DEVICES = ("auto", "cuda", "cpu", "mps")
DTYPES = ("auto", "bf16", "fp16", "fp32")
PARALLELISMS = ("ddp", "fsdp")


@dataclass
class LunarisCodexConfig:
    """Model architecture. Dense Llama-style by default; `n_experts >= 1` turns on MoC layers."""

    vocab_size: int = _f(50304, "Vocabulary size; must be at least the tokenizer's (lunaris prepare prints it).")
    d_model: int = _f(768, "Width of the residual stream (embedding size).")
    n_layers: int = _f(12, "Number of transformer blocks.")
    n_heads: int = _f(12, "Attention (query) heads; must divide d_model, and head_dim must be even.")
    n_kv_heads: Optional[int] = _f(None, "Key/value heads for GQA; must divide n_heads; null means n_heads.")
    max_seq_len: int = _f(1024, "Context length: training sequence length and generation limit.")
    dropout: float = _f(0.0, "Dropout on attention weights, residual branches and collaboration, in [0, 1).")
    rope_theta: float = _f(10000.0, "Rotary embedding base.")
    norm_eps: float = _f(1e-5, "RMSNorm epsilon.")
    norm_bias: bool = _f(True, "Learnable bias in the pre-attention and pre-FFN RMSNorms.")
    tie_embeddings: bool = _f(True, "Share the LM head weight with the token embedding.")
    ffn_hidden_size: Optional[int] = _f(None, "SwiGLU hidden size; null means ffn_mult*d_model*2/3 rounded up to multiple_of.")
    ffn_mult: float = _f(4.0, "FFN width multiplier used when ffn_hidden_size is null.")
    multiple_of: int = _f(256, "Round the derived FFN hidden size up to a multiple of this.")
    use_gradient_checkpointing: bool = _f(False, "Recompute each block in the backward pass (less memory, ~30% more compute).")
    n_reasoning_steps: int = _f(1, "IRL steps S in every FFN and expert; 1 is a plain SwiGLU.")
    irl_alpha: Optional[float] = _f(None, "IRL step scale; null means 1/sqrt(n_reasoning_steps).")
    # --- MoC (mixture of collaborating experts) ---
    n_experts: Optional[int] = _f(None, "Experts per MoC layer; null or 0 means a dense model.")
    top_k: int = _f(2, "Experts each token is routed to.")
    moc_every: int = _f(1, "MoC in every n-th layer (layers n-1, 2n-1, ...); dense FFN elsewhere.")
    capacity_factor: Optional[float] = _f(1.25, "Training capacity C = ceil(cf*N*K/E) slots per expert; null means dropless.")
    eval_capacity_factor: Optional[float] = _f(None, "Capacity in eval/generation; null means dropless there.")
    aux_loss_weight: float = _f(1e-2, "Weight of the load-balancing loss.")
    router_z_loss_weight: float = _f(1e-3, "Weight of the router z-loss.")
    router_jitter: float = _f(0.0, "Training-time multiplicative noise on router inputs (0 disables).")
    collab_mode: Optional[str] = _f(None, "Expert collaboration: mha | simple | none; null follows use_simple_collab (default mha).")
    use_simple_collab: Optional[bool] = _f(None, "Seed key: true means collab_mode simple, false means mha.")
    simple_collab_dropout: float = _f(0.1, "Dropout inside the simple collaboration MLP.")
    collab_heads: Optional[int] = _f(None, "Heads of the mha collaboration; null means n_heads.")

    # ---- derived values ----
    @property
    def kv_heads(self) -> int:
        return self.n_kv_heads or self.n_heads

    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_heads

    @property
    def ffn_hidden(self) -> int:
        if self.ffn_hidden_size:
            return self.ffn_hidden_size
        hidden = int(self.ffn_mult * self.d_model * 2 / 3)
        return self.multiple_of * math.ceil(hidden / self.multiple_of)

    @property
    def is_moc(self) -> bool:
        return bool(self.n_experts)

    @property
    def resolved_collab_mode(self) -> str:
        if self.collab_mode is not None:
            return self.collab_mode
        return "simple" if self.use_simple_collab else "mha"

    @property
    def irl_step_scale(self) -> float:
        return self.irl_alpha if self.irl_alpha is not None else 1.0 / math.sqrt(self.n_reasoning_steps)

    def is_moc_layer(self, layer: int) -> bool:
        return self.is_moc and (layer + 1) % self.moc_every == 0

    def problems(self) -> list:
        """Every invalid value, as one sentence each (empty when valid)."""
        p = []
        for name in ("vocab_size", "d_model", "n_layers", "n_heads", "max_seq_len", "multiple_of",
                     "n_reasoning_steps", "top_k", "moc_every"):
            value = getattr(self, name)
            if not isinstance(value, int) or value <= 0:
                p.append(f"model.{name} must be a positive integer, got {value!r}.")
        for name in ("rope_theta", "norm_eps", "ffn_mult"):
            if getattr(self, name) <= 0:
                p.append(f"model.{name} must be positive, got {getattr(self, name)!r}.")
        for name in ("n_kv_heads", "ffn_hidden_size", "irl_alpha", "capacity_factor",
                     "eval_capacity_factor", "collab_heads"):
            value = getattr(self, name)
            if value is not None and value <= 0:
                p.append(f"model.{name} must be positive or null, got {value!r}.")
        for name in ("dropout", "simple_collab_dropout"):
            value = getattr(self, name)
            if not 0.0 <= value < 1.0:
                p.append(f"model.{name} must be in [0, 1), got {value!r}.")
        for name in ("aux_loss_weight", "router_z_loss_weight", "router_jitter"):
            if getattr(self, name) < 0:
                p.append(f"model.{name} must be >= 0, got {getattr(self, name)!r}.")
        if self.n_experts is not None and self.n_experts < 0:
            p.append(f"model.n_experts must be >= 0 or null, got {self.n_experts!r}.")
        if self.d_model > 0 and self.n_heads > 0:
            if self.d_model % self.n_heads:
                p.append(f"model.d_model ({self.d_model}) must be divisible by model.n_heads ({self.n_heads}).")
            elif self.head_dim % 2:
                p.append(f"head_dim = d_model/n_heads = {self.head_dim} must be even for rotary embeddings; "
                         f"change d_model or n_heads.")
            if self.n_kv_heads and self.n_kv_heads > 0 and self.n_heads % self.n_kv_heads:
                p.append(f"model.n_heads ({self.n_heads}) must be divisible by model.n_kv_heads ({self.n_kv_heads}).")
            if self.collab_heads and self.collab_heads > 0 and self.d_model % self.collab_heads:
                p.append(f"model.d_model ({self.d_model}) must be divisible by model.collab_heads ({self.collab_heads}).")
        if self.is_moc and self.n_experts > 0 and self.top_k > self.n_experts:
            p.append(f"model.top_k ({self.top_k}) must be <= model.n_experts ({self.n_experts}).")
        if self.collab_mode is not None and self.collab_mode not in COLLAB_MODES:
            p.append(f"model.collab_mode must be one of {', '.join(COLLAB_MODES)}, got {self.collab_mode!r}.")
        elif self.collab_mode is not None and self.use_simple_collab is not None:
            implied = "simple" if self.use_simple_collab else "mha"
            if implied != self.collab_mode:
                p.append(f"model.use_simple_collab={self.use_simple_collab} contradicts model.collab_mode="
                         f"{self.collab_mode!r}; remove one of the two.")
        return p


@dataclass
class TrainConfig:
    """Training run: data, optimizer, schedule, precision, parallelism, checkpoints and logging."""

    model: LunarisCodexConfig = field(default_factory=LunarisCodexConfig, metadata={"help": "The model architecture (see above)."})
    data_dir: str = _f("data/", "Training shards: a directory made by `lunaris prepare`, or a flat directory of .npy shards.")
    val_data_dir: Optional[str] = _f(None, "Held-out shards; null means the `val/` split of a prepared data_dir, if any.")
    learning_rate: float = _f(3e-4, "Peak learning rate (after warmup).")
    min_lr: Optional[float] = _f(None, "Final learning rate of the cosine decay; null means learning_rate/10.")
    weight_decay: float = _f(0.1, "AdamW weight decay on >=2-D weights (not norms, biases or the router).")
    beta1: float = _f(0.9, "AdamW beta1.")
    beta2: float = _f(0.95, "AdamW beta2.")
    router_lr_scale: float = _f(0.5, "Learning-rate multiplier of the MoC router parameters.")
    warmup_steps: int = _f(2000, "Linear warmup steps.")
    max_steps: int = _f(200000, "Total optimizer steps.")
    batch_size: int = _f(16, "Sequences per micro-batch per process.")
    gradient_accumulation_steps: int = _f(1, "Micro-batches per optimizer step (effective batch = batch_size x world size x this).")
    grad_clip: float = _f(1.0, "Clip the global gradient norm to this (0 disables).")
    compile_model: bool = _f(False, "torch.compile the model (falls back to eager with a warning if it fails).")
    device: str = _f("auto", "auto | cuda | cpu | mps.")
    dtype: str = _f("auto", "auto | bf16 | fp16 | fp32 autocast precision (master weights stay fp32); auto is bf16 on capable GPUs, fp32 on CPU.")
    parallelism: str = _f("ddp", "ddp | fsdp (FSDP2 fully_shard per block) when launched with several processes.")
    seed: int = _f(1337, "Seed for initialization, data order and dropout.")
    out_dir: str = _f("checkpoints/run", "Run directory: checkpoints, metrics.jsonl, resolved config.")
    save_interval: int = _f(1000, "Save a checkpoint every N steps (and always at the end).")
    save_latest_always: bool = _f(True, "Update latest_checkpoint.pt at every save (false: only at the end and on preemption).")
    keep_last: int = _f(3, "Numbered checkpoints ckpt_<step>.pt to keep (0 keeps all).")
    log_interval: int = _f(20, "Log metrics every N steps.")
    eval_interval: int = _f(1000, "Evaluate on held-out data every N steps (0 disables).")
    eval_batches: int = _f(20, "Held-out batches per evaluation.")
    max_bad_steps: int = _f(10, "Stop after this many consecutive non-finite losses (each one skips its update).")
    peak_flops: Optional[float] = _f(None, "Peak FLOP/s per device for MFU; null means a table of known GPUs.")
    wandb_project: Optional[str] = _f(None, "W&B project; null disables W&B.")
    wandb_run_name: Optional[str] = _f(None, "W&B run name.")
    wandb_entity: Optional[str] = _f(None, "W&B entity (team).")
    tensorboard: bool = _f(False, "Also write TensorBoard event files to out_dir/tensorboard.")
    num_workers: int = _f(2, "DataLoader worker processes.")
    pin_memory: bool = _f(True, "Pin host memory for faster host-to-GPU copies.")
    persistent_workers: bool = _f(True, "Keep DataLoader workers alive between epochs.")
    prefetch_factor: int = _f(2, "Batches each worker loads ahead.")

    @property
    def resolved_min_lr(self) -> float:
        return self.min_lr if self.min_lr is not None else self.learning_rate / 10

    def problems(self) -> list:
        p = self.model.problems()
        for name in ("max_steps", "batch_size", "gradient_accumulation_steps", "save_interval",
                     "log_interval", "eval_batches", "max_bad_steps", "prefetch_factor"):
            value = getattr(self, name)
            if not isinstance(value, int) or value <= 0:
                p.append(f"{name} must be a positive integer, got {value!r}.")
        for name in ("warmup_steps", "eval_interval", "keep_last", "num_workers"):
            if getattr(self, name) < 0:
                p.append(f"{name} must be >= 0, got {getattr(self, name)!r}.")
        if self.learning_rate <= 0:
            p.append(f"learning_rate must be positive, got {self.learning_rate!r}.")
        if self.min_lr is not None and not 0 <= self.min_lr <= self.learning_rate:
            p.append(f"min_lr ({self.min_lr}) must be between 0 and learning_rate ({self.learning_rate}).")
        if self.warmup_steps > self.max_steps > 0:
            p.append(f"warmup_steps ({self.warmup_steps}) must not exceed max_steps ({self.max_steps}).")
        for name in ("weight_decay", "grad_clip", "router_lr_scale"):
            if getattr(self, name) < 0:
                p.append(f"{name} must be >= 0, got {getattr(self, name)!r}.")
        for name in ("beta1", "beta2"):
            if not 0 <= getattr(self, name) < 1:
                p.append(f"{name} must be in [0, 1), got {getattr(self, name)!r}.")
        for name, choices in (("device", DEVICES), ("dtype", DTYPES), ("parallelism", PARALLELISMS)):
            if getattr(self, name) not in choices:
                p.append(f"{name} must be one of {', '.join(choices)}, got {getattr(self, name)!r}.")
        if self.peak_flops is not None and self.peak_flops <= 0:
            p.append(f"peak_flops must be positive or null, got {self.peak_flops!r}.")
        return p

    def validate(self) -> "TrainConfig":
        raise_problems(self.problems())
        return self

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict, source: str = "config") -> "TrainConfig":
        return _build_train_config(data, source)


def raise_problems(problems: list, source: str = "config") -> None:
    if problems:
        lines = "\n".join(f"  - {p}" for p in problems)
        n = len(problems)
        raise ConfigError(f"{source} has {n} problem{'s' if n > 1 else ''}:\n{lines}")


# ---------------------------------------------------------------------------------------------
# Loading and overrides
# ---------------------------------------------------------------------------------------------

def _field_types(cls) -> dict:
    hints = typing.get_type_hints(cls)
    return {f.name: hints[f.name] for f in dataclasses.fields(cls)}


def _base_type(tp):
    """Optional[X] -> (X, True); X -> (X, False)."""
    if typing.get_origin(tp) is typing.Union:
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        return args[0], True
    return tp, False


def _coerce(value, tp, key: str, problems: list):
    """Convert a YAML or command-line value to the field's type; record a problem if impossible."""
    base, optional = _base_type(tp)
    if isinstance(value, str) and value.strip().lower() in ("null", "none", "~") and optional:
        return None
    if value is None:
        if optional:
            return None
        problems.append(f"{key} must not be null.")
        return None
    try:
        if base is bool:
            if isinstance(value, bool):
                return value
            if isinstance(value, str) and value.strip().lower() in ("true", "yes", "on", "1", "false", "no", "off", "0"):
                return value.strip().lower() in ("true", "yes", "on", "1")
            raise ValueError
        if base is int:
            if isinstance(value, bool):
                raise ValueError
            if isinstance(value, float) and value.is_integer():
                return int(value)
            if isinstance(value, str):
                number = float(value.replace("_", ""))
                if not number.is_integer():
                    raise ValueError
                return int(number)
            if isinstance(value, int):
                return value
            raise ValueError
        if base is float:
            if isinstance(value, bool):
                raise ValueError
            return float(value)
        if base is str:
            if isinstance(value, (dict, list)):
                raise ValueError
            return str(value)
    except (TypeError, ValueError):
        pass
    expected = {bool: "true or false", int: "an integer", float: "a number", str: "a string"}.get(base, str(base))
    problems.append(f"{key} must be {expected}{' or null' if optional else ''}, got {value!r}.")
    return None


def _suggest(key: str, candidates) -> str:
    match = difflib.get_close_matches(key, list(candidates), n=1, cutoff=0.6)
    return f" (did you mean '{match[0]}'?)" if match else ""


def _fill(cls, data: dict, prefix: str, problems: list, other_section=()):
    types = _field_types(cls)
    kwargs = {}
    for key, value in data.items():
        full = f"{prefix}{key}"
        if key not in types:
            if key in other_section:  # a real key, in the wrong section
                hint = f" (did you mean '{'model.' if not prefix else ''}{key}'? it belongs "
                hint += "under 'model:')" if not prefix else "at the top level, not under 'model:')"
            else:
                hint = _suggest(key, types)
            problems.append(f"unknown key '{full}'{hint}.")
            continue
        if key == "model":
            continue
        kwargs[key] = _coerce(value, types[key], full, problems)
    return kwargs


def _build_train_config(data: dict, source: str) -> TrainConfig:
    if not isinstance(data, dict):
        raise ConfigError(f"{source} must be a YAML mapping of keys to values (got {type(data).__name__}).")
    problems: list = []
    model_names = set(_field_types(LunarisCodexConfig))
    train_names = set(_field_types(TrainConfig)) - {"model"}
    model_data = data.get("model") or {}
    if not isinstance(model_data, dict):
        problems.append("'model' must be a mapping of model keys (vocab_size, d_model, ...).")
        model_data = {}
    model_kwargs = _fill(LunarisCodexConfig, model_data, "model.", problems, other_section=train_names)
    train_kwargs = _fill(TrainConfig, data, "", problems, other_section=model_names)
    if problems:  # type problems make the values below meaningless; report them first
        raise_problems(problems, source)
    model_kwargs = {k: v for k, v in model_kwargs.items()}
    config = TrainConfig(model=LunarisCodexConfig(**model_kwargs), **train_kwargs)
    raise_problems(config.problems(), source)
    return config


def parse_overrides(overrides) -> dict:
    """`['--learning_rate=1e-3', '--model.n_layers', '4']` or a dict -> nested dict of raw values."""
    if overrides is None:
        return {}
    if isinstance(overrides, dict):
        items = list(overrides.items())
    else:
        items = []
        args = list(overrides)
        i = 0
        while i < len(args):
            arg = args[i]
            if not arg.startswith("--"):
                raise ConfigError(f"override '{arg}' must look like --key=value or --model.key=value.")
            body = arg[2:]
            if "=" in body:
                key, value = body.split("=", 1)
            elif i + 1 < len(args) and not args[i + 1].startswith("--"):
                key, value = body, args[i + 1]
                i += 1
            else:
                raise ConfigError(f"override '{arg}' has no value; write it as --{body}=VALUE.")
            items.append((key.replace("-", "_"), value))
            i += 1
    nested: dict = {}
    for key, value in items:
        if isinstance(value, str):
            try:  # YAML typing for command-line values: 1e-3, true, null, [1, 2]
                parsed = yaml.safe_load(value)
                value = value if isinstance(parsed, (dict, list)) else parsed
            except yaml.YAMLError:
                pass
        parts = key.split(".")
        target = nested
        for part in parts[:-1]:
            target = target.setdefault(part, {})
        target[parts[-1]] = value
    return nested


def _merge(base: dict, extra: dict) -> dict:
    out = dict(base)
    for key, value in extra.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _merge(out[key], value)
        else:
            out[key] = value
    return out


def read_yaml(path) -> dict:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file {path} does not exist; pass the path of a YAML file "
                          f"(see configs/ for ready presets).")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as exc:
        raise ConfigError(f"config file {path} is not valid YAML: {exc}") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"config file {path} cannot be read: {exc}") from None
    return data if data is not None else {}


def load_config(path=None, overrides=None) -> TrainConfig:
    """Read a YAML config in the seeds' format, apply overrides, validate, and return a TrainConfig.

    `overrides` is a list like `['--learning_rate=1e-3', '--model.n_layers=4']` or a dict
    like `{'learning_rate': 1e-3, 'model.n_layers': 4}`; values are typed from the field.
    """
    data = read_yaml(path) if path is not None else {}
    source = str(path) if path is not None else "config"
    if not isinstance(data, dict):
        raise ConfigError(f"{source} must be a YAML mapping of keys to values (got {type(data).__name__}).")
    return _build_train_config(_merge(data, parse_overrides(overrides)), source)


def model_config_from_dict(data: dict, source: str = "model config") -> LunarisCodexConfig:
    """Build and validate a LunarisCodexConfig from a plain dict (e.g. stored in a checkpoint)."""
    problems: list = []
    kwargs = _fill(LunarisCodexConfig, data, "model.", problems)
    raise_problems(problems, source)
    config = LunarisCodexConfig(**kwargs)
    raise_problems(config.problems(), source)
    return config


def field_docs(cls) -> list:
    """(name, default, help) for every field, for the README reference and `lunaris config --keys`."""
    rows = []
    for f in dataclasses.fields(cls):
        if f.name == "model":
            continue
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        rows.append((f.name, default, f.metadata.get("help", "")))
    return rows
