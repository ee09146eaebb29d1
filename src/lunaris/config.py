"""Configuration: dataclasses, YAML loading, `--a.b=c` overrides, and validation.

The YAML format is the one shown in the README: model keys under `model:`, training keys at the top level.
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

from lunaris.errors import ConfigError, suggest


def _f(default, help: str):
    """A dataclass field with a one-line description."""
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda: type(default)(default), metadata={"help": help})
    return field(default=default, metadata={"help": help})


_suggest = suggest  # the one did-you-mean helper (lunaris.errors)


class _Checks:
    """Collects `(keys involved, sentence)` for one config section.

    `origins` maps a full key (`max_steps`, `model.n_heads`) to the override that set it, so that a
    sentence about that value says so: `max_steps (10, from --max_steps=10)`; a key in `defaults`
    (not set at all) is named as the default: `model.d_model (768, the default)`.
    """

    def __init__(self, config, prefix: str, origins=None, defaults=()):
        self.config, self.prefix, self.origins, self.found = config, prefix, origins or {}, []
        self.defaults = defaults  # keys the config did not set (named as such in a combination)

    def key(self, name: str) -> str:
        return self.prefix + name

    def got(self, name: str) -> str:
        """'got 0' or 'got 0 (from --model.n_layers=0)'."""
        return f"got {getattr(self.config, name)!r}{_from(self.origins.get(self.key(name)))}"

    def ref(self, name: str, form: str = None) -> str:
        """'model.d_model (100)' or 'max_steps (10, from --max_steps=10)'; `form` formats the value instead."""
        value, origin = getattr(self.config, name), self.origins.get(self.key(name))
        if form is not None:
            return form.format(value) + _from(origin)
        if origin:
            return f"{self.key(name)} ({value}, from {origin})"
        if self.key(name) in self.defaults:
            return f"{self.key(name)} ({value}, the default)"
        return f"{self.key(name)} ({value})"

    def add(self, names, sentence: str) -> None:
        self.found.append((tuple(self.key(n) for n in names), sentence))


COLLAB_MODES = ("mha", "simple", "none")
LOAD_BALANCES = ("aux_loss", "bias")
DEVICES = ("auto", "cuda", "cpu", "mps")
DTYPES = ("auto", "bf16", "fp16", "fp32")
PARALLELISMS = ("ddp", "fsdp")
OPTIMIZERS = ("adamw", "muon")
LR_SCHEDULES = ("cosine", "wsd", "linear")
ATTENTION_MASKS = ("causal", "document")


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
    ffn_hidden_size: Optional[int] = _f(
        None, "SwiGLU hidden size; null means ffn_mult*d_model*2/3 rounded up to multiple_of.")
    ffn_mult: float = _f(4.0, "FFN width multiplier used when ffn_hidden_size is null.")
    multiple_of: int = _f(256, "Round the derived FFN hidden size up to a multiple of this.")
    use_gradient_checkpointing: bool = _f(
        False, "Recompute each block in the backward pass (less memory, ~30% more compute).")
    n_reasoning_steps: int = _f(1, "IRL steps S in every FFN and expert; 1 is a plain SwiGLU.")
    irl_alpha: Optional[float] = _f(None, "IRL step scale; null means 1/sqrt(n_reasoning_steps).")
    # --- recipe options ---
    qk_norm: bool = _f(
        False, "RMSNorm (learnable weight, no bias, per head over head_dim) on queries and keys before rotary "
               "(the Qwen3 layout).")
    zero_init_out: bool = _f(
        False, "Initialize the residual output projections (attention proj, FFN and expert down, collaboration "
               "output) to zero, so every block starts as the identity.")
    logit_softcap: Optional[float] = _f(
        None, "Soft cap on the logits, cap*tanh(logits/cap) (Gemma 2); must be positive; null disables.")
    attention_mask: str = _f(
        "causal", "causal | document: with document, a token attends only within its own document of a packed "
                  "row (document_separator_id ends a document) and rotary positions restart at each document.")
    document_separator_id: Optional[int] = _f(
        None, "End-of-text id that ends a document (attention_mask: document); null means the training data's "
              "end-of-text id (read from its manifest and saved with the checkpoint).")
    # --- MoC (mixture of collaborating experts) ---
    n_experts: Optional[int] = _f(None, "Experts per MoC layer; null or 0 means a dense model.")
    top_k: int = _f(2, "Experts each token is routed to.")
    n_shared_experts: int = _f(
        0, "Always-on shared experts beside the routed ones (DeepSeekMoE): every token also passes through one "
           "SwiGLU of n_shared_experts*ffn_hidden_size, added to the routed output; 0 disables.")
    moc_every: int = _f(1, "MoC in every n-th layer (layers n-1, 2n-1, ...); dense FFN elsewhere.")
    capacity_factor: Optional[float] = _f(
        1.25, "Training capacity C = ceil(cf*N*K/E) slots per expert; null means dropless.")
    eval_capacity_factor: Optional[float] = _f(None, "Capacity in eval/generation; null means dropless there.")
    aux_loss_weight: float = _f(1e-2, "Weight of the load-balancing loss.")
    router_z_loss_weight: float = _f(1e-3, "Weight of the router z-loss.")
    router_jitter: float = _f(0.0, "Training-time multiplicative noise on router inputs (0 disables).")
    load_balance: str = _f(
        "aux_loss", "MoC load balancing: aux_loss (the load-balancing loss) | bias (auxiliary-loss-free: a per-expert "
                    "routing bias, moved after each step toward even load; no load-balancing loss).")
    balance_bias_rate: float = _f(
        1e-3, "With load_balance: bias, how far each step moves an expert's bias (up if underloaded, down if over).")
    collab_mode: Optional[str] = _f(
        None, "Expert collaboration: mha | simple | none; null follows use_simple_collab (default mha).")
    use_simple_collab: Optional[bool] = _f(None, "Older spelling of collab_mode: true means simple, false means mha.")
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
        return [message for _, message in self.checks()]

    def checks(self, origins=None, defaults=()) -> list:
        """Every invalid value as `(keys involved, sentence)`; `origins` and `defaults` as in `_Checks`."""
        c = _Checks(self, "model.", origins, defaults)
        for name in ("vocab_size", "d_model", "n_layers", "n_heads", "max_seq_len", "multiple_of",
                     "n_reasoning_steps", "top_k", "moc_every"):
            value = getattr(self, name)
            if not isinstance(value, int) or value <= 0:
                c.add([name], f"{c.key(name)} must be a positive integer, {c.got(name)}.")
        for name in ("rope_theta", "norm_eps", "ffn_mult"):
            if getattr(self, name) <= 0:
                c.add([name], f"{c.key(name)} must be positive, {c.got(name)}.")
        for name in ("n_kv_heads", "ffn_hidden_size", "irl_alpha", "capacity_factor",
                     "eval_capacity_factor", "collab_heads", "logit_softcap"):
            value = getattr(self, name)
            if value is not None and value <= 0:
                c.add([name], f"{c.key(name)} must be positive or null, {c.got(name)}.")
        for name in ("dropout", "simple_collab_dropout"):
            if not 0.0 <= getattr(self, name) < 1.0:
                c.add([name], f"{c.key(name)} must be in [0, 1), {c.got(name)}.")
        for name in ("aux_loss_weight", "router_z_loss_weight", "router_jitter"):
            if getattr(self, name) < 0:
                c.add([name], f"{c.key(name)} must be >= 0, {c.got(name)}.")
        if self.load_balance not in LOAD_BALANCES:
            c.add(["load_balance"], f"model.load_balance must be one of {', '.join(LOAD_BALANCES)}, "
                                    f"{c.got('load_balance')}{_suggest(self.load_balance, LOAD_BALANCES)}.")
        if not self.balance_bias_rate > 0:
            c.add(["balance_bias_rate"], f"model.balance_bias_rate must be positive, {c.got('balance_bias_rate')}.")
        if not isinstance(self.n_shared_experts, int) or self.n_shared_experts < 0:
            c.add(["n_shared_experts"], f"model.n_shared_experts must be an integer >= 0, {c.got('n_shared_experts')}.")
        if self.n_experts is not None and self.n_experts < 0:
            c.add(["n_experts"], f"model.n_experts must be >= 0 or null, {c.got('n_experts')}.")
        if self.d_model > 0 and self.n_heads > 0:
            if self.d_model % self.n_heads:
                c.add(["d_model", "n_heads"], f"{c.ref('d_model')} must be divisible by {c.ref('n_heads')}.")
            elif self.head_dim % 2:
                c.add(["d_model", "n_heads"],
                      f"head_dim = {c.ref('d_model')} / {c.ref('n_heads')} = {self.head_dim} must be even "
                      f"for rotary embeddings; change d_model or n_heads.")
            if self.n_kv_heads and self.n_kv_heads > 0 and self.n_heads % self.n_kv_heads:
                c.add(["n_heads", "n_kv_heads"],
                      f"{c.ref('n_heads')} must be divisible by {c.ref('n_kv_heads')}.")
            if self.collab_heads and self.collab_heads > 0 and self.d_model % self.collab_heads:
                c.add(["d_model", "collab_heads"],
                      f"{c.ref('d_model')} must be divisible by {c.ref('collab_heads')}.")
        if self.is_moc and self.n_experts > 0 and self.top_k > self.n_experts:
            c.add(["top_k", "n_experts"], f"{c.ref('top_k')} must be <= {c.ref('n_experts')}.")
        if self.collab_mode is not None and self.collab_mode not in COLLAB_MODES:
            c.add(["collab_mode"], f"model.collab_mode must be one of {', '.join(COLLAB_MODES)}, "
                                   f"{c.got('collab_mode')}{_suggest(self.collab_mode, COLLAB_MODES)}.")
        elif self.collab_mode is not None and self.use_simple_collab is not None:
            implied = "simple" if self.use_simple_collab else "mha"
            if implied != self.collab_mode:
                c.add(["use_simple_collab", "collab_mode"],
                      f"{c.ref('use_simple_collab', 'model.use_simple_collab={}')} contradicts "
                      f"{c.ref('collab_mode', 'model.collab_mode={!r}')}; remove one of the two.")
        if self.attention_mask not in ATTENTION_MASKS:
            c.add(["attention_mask"], f"model.attention_mask must be one of {', '.join(ATTENTION_MASKS)}, "
                                      f"{c.got('attention_mask')}{_suggest(self.attention_mask, ATTENTION_MASKS)}.")
        separator = self.document_separator_id
        if separator is not None and (separator < 0 or (self.vocab_size > 0 and separator >= self.vocab_size)):
            c.add(["document_separator_id", "vocab_size"],
                  f"model.document_separator_id must be a token id in [0, vocab_size), "
                  f"{c.got('document_separator_id')} with {c.ref('vocab_size')}.")
        return c.found

    def build_problems(self) -> list:
        """Problems that matter only when a model is built from this config: values `lunaris train` fills in
        from the training data (so a training config may leave them null) but a model needs."""
        if self.attention_mask == "document" and self.document_separator_id is None:
            return ["model.attention_mask: document needs document_separator_id (the end-of-text token id that "
                    "ends each document); set model.document_separator_id, or train from a data directory made "
                    "by `lunaris prepare`, whose manifest gives it."]
        return []

    def sized(self) -> "LunarisCodexConfig":
        """This config, buildable whatever the training data fills in later (a placeholder document separator):
        for counting parameters and timing steps, which do not depend on those values."""
        if self.attention_mask == "document" and self.document_separator_id is None:
            return dataclasses.replace(self, document_separator_id=0)
        return self


@dataclass
class TrainConfig:
    """Training run: data, optimizer, schedule, precision, parallelism, checkpoints and logging."""

    model: LunarisCodexConfig = field(
        default_factory=LunarisCodexConfig, metadata={"help": "The model architecture (see above)."})
    data_dir: str = _f(
        "data/", "Training shards: a directory made by `lunaris prepare`, or a flat directory of .npy shards.")
    val_data_dir: Optional[str] = _f(
        None, "Held-out shards; null means the `val/` split of a prepared data_dir, if any.")
    optimizer: str = _f(
        "adamw", "adamw | muon: Muon (orthogonalized momentum) for the hidden matrices of the blocks and each "
                 "expert matrix, AdamW for embeddings, LM head, norms, biases and the router.")
    learning_rate: float = _f(3e-4, "Peak learning rate (after warmup) of AdamW (with muon: of the AdamW groups).")
    muon_lr: float = _f(0.02, "Peak learning rate of the Muon groups (optimizer: muon); follows the same schedule.")
    muon_momentum: float = _f(0.95, "Muon momentum (Nesterov).")
    lr_schedule: str = _f(
        "cosine", "cosine | wsd | linear: after warmup, cosine or linear decay to min_lr over the run; wsd holds "
                  "the peak, then decays linearly to min_lr over the last decay_fraction of max_steps.")
    decay_fraction: float = _f(0.2, "Share of max_steps spent decaying with lr_schedule: wsd.")
    min_lr: Optional[float] = _f(None, "Final learning rate of the decay; null means learning_rate/10.")
    weight_decay: float = _f(0.1, "AdamW weight decay on >=2-D weights (not norms, biases or the router).")
    beta1: float = _f(0.9, "AdamW beta1.")
    beta2: float = _f(0.95, "AdamW beta2.")
    router_lr_scale: float = _f(0.5, "Learning-rate multiplier of the MoC router parameters.")
    warmup_steps: int = _f(2000, "Linear warmup steps.")
    max_steps: int = _f(200000, "Total optimizer steps.")
    batch_size: int = _f(16, "Sequences per micro-batch per process.")
    gradient_accumulation_steps: int = _f(
        1, "Micro-batches per optimizer step (effective batch = batch_size x world size x this).")
    grad_clip: float = _f(1.0, "Clip the global gradient norm to this (0 disables).")
    compile_model: bool = _f(False, "torch.compile the model (falls back to eager with a warning if it fails).")
    device: str = _f("auto", "auto | cuda | cpu | mps.")
    dtype: str = _f(
        "auto", "auto | bf16 | fp16 | fp32 autocast precision (master weights stay fp32); "
                "auto is bf16 on capable GPUs, fp32 on CPU.")
    parallelism: str = _f("ddp", "ddp | fsdp (FSDP2 fully_shard per block) when launched with several processes.")
    seed: int = _f(1337, "Seed for initialization, data order and dropout.")
    out_dir: str = _f("checkpoints/run", "Run directory: checkpoints, metrics.jsonl, resolved config.")
    save_interval: int = _f(1000, "Save a checkpoint every N steps (and always at the end).")
    save_latest_always: bool = _f(
        True, "Update latest_checkpoint.pt at every save (false: only at the end and on preemption).")
    keep_last: int = _f(3, "Numbered checkpoints ckpt_<step>.pt to keep (0 keeps all).")
    log_interval: int = _f(20, "Log metrics every N steps.")
    eval_interval: int = _f(1000, "Evaluate on held-out data every N steps (0 disables).")
    eval_batches: int = _f(20, "Held-out batches per evaluation.")
    eval_tasks: list = _f(
        [], "Downstream tasks scored at every evaluation (eval/<task>/acc): embedded, NAME=PATH, or {name, path, "
            "limit} items; see the README, Evaluate.")
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
        """Every invalid value, model and training, as one sentence each (empty when valid)."""
        return [message for _, message in self.checks()]

    def checks(self, origins=None, defaults=()) -> list:
        """Every invalid value as `(keys involved, sentence)`; `origins` and `defaults` as in `_Checks`.

        A `warmup_steps` longer than `max_steps` is allowed: the run ends during warmup (the learning rate
        never reaches its peak), which is what a short trial run of a long config wants.
        """
        found = self.model.checks(origins, defaults)
        c = _Checks(self, "", origins, defaults)
        for name in ("max_steps", "batch_size", "gradient_accumulation_steps", "save_interval",
                     "log_interval", "eval_batches", "max_bad_steps", "prefetch_factor"):
            value = getattr(self, name)
            if not isinstance(value, int) or value <= 0:
                c.add([name], f"{name} must be a positive integer, {c.got(name)}.")
        for name in ("warmup_steps", "eval_interval", "keep_last", "num_workers"):
            if getattr(self, name) < 0:
                c.add([name], f"{name} must be >= 0, {c.got(name)}.")
        if self.learning_rate <= 0:
            c.add(["learning_rate"], f"learning_rate must be positive, {c.got('learning_rate')}.")
        if self.min_lr is not None and not 0 <= self.min_lr <= self.learning_rate:
            c.add(["min_lr", "learning_rate"],
                  f"{c.ref('min_lr')} must be between 0 and {c.ref('learning_rate')}.")
        for name in ("weight_decay", "grad_clip", "router_lr_scale"):
            if getattr(self, name) < 0:
                c.add([name], f"{name} must be >= 0, {c.got(name)}.")
        for name in ("beta1", "beta2", "muon_momentum"):
            if not 0 <= getattr(self, name) < 1:
                c.add([name], f"{name} must be in [0, 1), {c.got(name)}.")
        if self.muon_lr <= 0:
            c.add(["muon_lr"], f"muon_lr must be positive, {c.got('muon_lr')}.")
        if not 0 < self.decay_fraction <= 1:
            c.add(["decay_fraction"], f"decay_fraction must be in (0, 1], {c.got('decay_fraction')}.")
        for name, choices in (("optimizer", OPTIMIZERS), ("lr_schedule", LR_SCHEDULES)):
            value = getattr(self, name)
            if value not in choices:
                c.add([name], f"{name} must be one of {', '.join(choices)}, {c.got(name)}{_suggest(value, choices)}.")
        if self.optimizer == "muon" and self.parallelism == "fsdp":
            c.add(["optimizer", "parallelism"], "optimizer: muon orthogonalizes whole matrices, which FSDP shards "
                                                "across processes; use parallelism: ddp with muon, or adamw with fsdp.")
        for name, choices in (("device", DEVICES), ("dtype", DTYPES), ("parallelism", PARALLELISMS)):
            value = getattr(self, name)
            if value not in choices:
                c.add([name], f"{name} must be one of {', '.join(choices)}, {c.got(name)}{_suggest(value, choices)}.")
        if self.peak_flops is not None and self.peak_flops <= 0:
            c.add(["peak_flops"], f"peak_flops must be positive or null, {c.got('peak_flops')}.")
        if self.eval_tasks:
            from lunaris.tasks.formats import spec_problems
            for problem in spec_problems(self.eval_tasks):
                c.add(["eval_tasks"], f"eval_tasks: {problem}")
        return found + c.found

    def validate(self) -> "TrainConfig":
        raise_problems(self.problems())
        return self

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict, source: str = "config") -> "TrainConfig":
        return _build_train_config(data, source)


def raise_problems(problems: list, source: str = "config") -> None:
    """Raise one ConfigError listing every problem (nothing when the list is empty)."""
    if problems:
        lines = "\n".join(f"  - {p}" for p in problems)
        n = len(problems)
        raise ConfigError(f"{source} has {n} problem{'s' if n > 1 else ''}:\n{lines}", problems)


# ---------------------------------------------------------------------------------------------
# Loading and overrides
#
# A config is resolved in one pass that never stops early: the file and the overrides are
# flattened to `{"model.d_model": ..., "max_steps": ...}`, every key is checked and typed, the
# config is built from the values that could be typed (defaults stand in for the others), and
# its value checks run. Every problem found on the way goes into one ConfigError; value checks
# that involve a key whose value could not be typed are left out (they would judge a default).
# ---------------------------------------------------------------------------------------------

_INVALID = object()  # _coerce's answer for a value that cannot have the field's type


def _field_types(cls) -> dict:
    hints = typing.get_type_hints(cls)
    return {f.name: hints[f.name] for f in dataclasses.fields(cls) if f.name != "model"}


def _base_type(tp):
    """Optional[X] -> (X, True); X -> (X, False)."""
    if typing.get_origin(tp) is typing.Union:
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        return args[0], True
    return tp, False


def _from(origin) -> str:
    return f" (from {origin})" if origin else ""


NONE_IS_A_VALUE = {"collab_mode"}  # string keys where "none" is a choice, not null


def _coerce(value, tp, key: str, problems: list, origin=None, raw=None):
    """Convert a YAML or command-line value to the field's type, or record a problem and return _INVALID.

    `raw` is the text of a command-line value, used as is for string fields (`--wandb_run_name=007`).
    """
    base, optional = _base_type(tp)
    # "none" is one of model.collab_mode's values (plain top-k), so there only null and ~ mean null
    nulls = ("null", "~") if key.rsplit(".", 1)[-1] in NONE_IS_A_VALUE else ("null", "none", "~")
    if isinstance(value, str) and value.strip().lower() in nulls and optional:
        return None
    if value is None:
        if optional:
            return None
        problems.append(f"{key} must not be null{_from(origin)}.")
        return _INVALID
    try:
        if base is bool:
            if isinstance(value, bool):
                return value
            text = value.strip().lower() if isinstance(value, str) else None
            if text in ("true", "yes", "on", "1", "false", "no", "off", "0"):
                return text in ("true", "yes", "on", "1")
            raise ValueError
        if base is int:
            if isinstance(value, bool):
                raise ValueError
            if isinstance(value, float) and value.is_integer():
                return int(value)
            if isinstance(value, str):
                text = value.strip().replace("_", "")
                try:
                    return int(text)
                except ValueError:
                    number = float(text)  # 1e4
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
            return raw if isinstance(raw, str) else str(value)
        if base is list:  # a command-line value is YAML text (a flow list) or one comma-separated entry
            if isinstance(value, str):
                value = yaml.safe_load(value) if value.strip().startswith("[") else [value]
            if isinstance(value, list):
                return value
            raise ValueError
    except (TypeError, ValueError, OverflowError, yaml.YAMLError):
        pass
    expected = {bool: "true or false", int: "an integer", float: "a number", str: "a string",
                list: "a list"}.get(base, str(base))
    problems.append(f"{key} must be {expected}{' or null' if optional else ''}, got {value!r}{_from(origin)}.")
    return _INVALID


def _unknown_key(key: str, origin, model_names, train_names) -> str:
    """The sentence for a key that is no field, with a "did you mean" hint where one fits."""
    in_model = key.startswith("model.")
    name = key[len("model."):] if in_model else key
    right = name if in_model else f"model.{name}"  # the same key in the other section
    if name in (train_names if in_model else model_names):
        if origin:
            hint = f" (did you mean '--{right}'?)"
        elif in_model:
            hint = f" (did you mean '{right}'? it belongs at the top level, not under 'model:')"
        else:
            hint = f" (did you mean '{right}'? it belongs under 'model:')"
    elif origin:
        everything = list(train_names) + [f"model.{n}" for n in model_names]
        match = difflib.get_close_matches(key, everything, n=1, cutoff=0.6)
        hint = f" (did you mean '--{match[0]}'?)" if match else ""
    else:
        hint = _suggest(name, model_names if in_model else train_names)
    where = f" in {origin}" if origin else ""
    return f"unknown key '{key}'{where}{hint}."


def _override_items(overrides, problems: list) -> tuple:
    """`(items, count)`: `(key, value, how it was written, raw text)` per override; malformed ones become problems.

    `overrides` is a list of command-line words (`--key=value`, `--key value`, `--model.key=value`)
    or a dict (`{'learning_rate': 1e-3, 'model.n_layers': 4}` or `{'model': {'n_layers': 4}}`).
    """
    if overrides is None:
        return [], 0
    written = []  # (key, value, text, raw)
    count = 0
    if isinstance(overrides, dict):
        for key, value in overrides.items():
            count += 1
            written.append((str(key), value, f"--{key}={value}", None))
    else:
        args = [str(a) for a in overrides]
        i = 0
        while i < len(args):
            arg = args[i]
            i += 1
            count += 1
            if not arg.startswith("--"):
                problems.append(f"override '{arg}' must look like --key=value or --model.key=value.")
                continue
            body = arg[2:]
            if "=" in body:
                key, value = body.split("=", 1)
                written.append((key, value, arg, value))
            elif i < len(args) and not args[i].startswith("--"):
                written.append((body, args[i], f"{arg} {args[i]}", args[i]))
                i += 1
            else:
                problems.append(f"override '{arg}' has no value; write it as --{body}=VALUE.")
    items = []
    while written:
        key, value, text, raw = written.pop(0)
        key = key.replace("-", "_")
        if isinstance(value, dict):  # a dict override may nest: {'model': {'n_layers': 4}}
            written[:0] = [(f"{key}.{k}", v, f"--{key}.{k}={v}", None) for k, v in value.items()]
            continue
        if not all(key.split(".")):
            problems.append(f"override '{text}' names no key; write it as --key=value or --model.key=value.")
            continue
        if key == "model":
            problems.append(f"override '{text}' sets the whole model section; set one model key at a time, "
                            f"e.g. --model.n_layers=4.")
            continue
        if isinstance(value, str):
            try:  # YAML typing for command-line values: 1e-3, true, null (a list or mapping stays text)
                parsed = yaml.safe_load(value)
                value = value if isinstance(parsed, (dict, list)) else parsed
            except yaml.YAMLError:
                pass
        items.append((key, value, text, raw))
    return items, count


def parse_overrides(overrides) -> dict:
    """`['--learning_rate=1e-3', '--model.n_layers', '4']` or a dict -> nested dict of YAML-typed values."""
    problems: list = []
    items, _ = _override_items(overrides, problems)
    raise_problems(problems, "the overrides")
    nested: dict = {}
    for key, value, _, _ in items:
        parts = key.split(".")
        target = nested
        for part in parts[:-1]:
            if not isinstance(target.get(part), dict):
                target[part] = {}
            target = target[part]
        target[parts[-1]] = value
    return nested


def _flatten_file(data, source: str, problems: list) -> dict:
    """A config mapping -> `{"model.d_model": ..., "max_steps": ...}`; a malformed layout becomes a problem."""
    flat: dict = {}
    if not isinstance(data, dict):
        problems.append(f"{source} must be a YAML mapping of keys to values (got {type(data).__name__}).")
        return flat
    for key, value in data.items():
        key = str(key)
        if key != "model":
            flat[key] = value
        elif isinstance(value, dict):
            flat.update({f"model.{k}": v for k, v in value.items()})
        elif value is not None:
            problems.append(f"'model' must be a mapping of model keys (vocab_size, d_model, ...), got {value!r}.")
    return flat


def _source_name(path, override_count: int, command_line: bool) -> str:
    """What the error heading blames: the file, and the overrides when there are any."""
    if not override_count:
        return str(path) if path is not None else "config"
    base = str(path) if path is not None else "the default config"
    kind = "command-line override" if command_line else "override"
    return f"{base} with {override_count} {kind}{'s' if override_count > 1 else ''}"


def _resolve(flat: dict, origins: dict, raws: dict, problems: list, model_only: bool = False):
    """Check, type and build; every problem goes into `problems`. Returns a TrainConfig (or a model config)."""
    model_types = _field_types(LunarisCodexConfig)
    train_types = {} if model_only else _field_types(TrainConfig)
    model_kwargs, train_kwargs, invalid = {}, {}, set()
    for key, value in flat.items():
        in_model = key.startswith("model.")
        name = key[len("model."):] if in_model else key
        types = model_types if in_model else train_types
        origin = origins.get(key)
        if name not in types:
            problems.append(_unknown_key(key, origin, model_types, train_types))
            continue
        typed = _coerce(value, types[name], key, problems, origin, raws.get(key))
        if typed is _INVALID:
            invalid.add(key)
        else:
            (model_kwargs if in_model else train_kwargs)[name] = typed
    model = LunarisCodexConfig(**model_kwargs)
    config = model if model_only else TrainConfig(model=model, **train_kwargs)
    defaults = {f"model.{n}" for n in model_types if n not in model_kwargs}
    defaults |= {n for n in train_types if n not in train_kwargs}
    problems.extend(message for keys, message in config.checks(origins, defaults - invalid)
                    if not invalid.intersection(keys))
    return config


def _build_train_config(data, source: str) -> TrainConfig:
    problems: list = []
    config = _resolve(_flatten_file(data, source, problems), {}, {}, problems)
    raise_problems(problems, source)
    return config


def read_yaml(path, what: str = "config file", hint: str = "see configs/ for ready presets"):
    """The parsed YAML of `path` ({} for an empty file); a missing, unreadable or invalid file is a ConfigError
    naming `what` and, for a missing one, the `hint`."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{what} {path} does not exist; pass the path of a YAML file ({hint}).")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as exc:
        raise ConfigError(f"{what} {path} is not valid YAML: {exc}") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{what} {path} cannot be read: {exc}") from None
    return data if data is not None else {}


def load_config(path=None, overrides=None) -> TrainConfig:
    """Read a YAML config (the format shown in the README), apply overrides, validate, and return a TrainConfig.

    `overrides` is a list like `['--learning_rate=1e-3', '--model.n_layers=4']` or a dict
    like `{'learning_rate': 1e-3, 'model.n_layers': 4}`; values are typed from the field.
    Every problem (unknown keys, wrong types, invalid values and combinations, malformed
    overrides) is raised together in one ConfigError; a problem with a value that came from an
    override names that override.
    """
    data = read_yaml(path) if path is not None else {}
    problems: list = []
    flat = _flatten_file(data, str(path) if path is not None else "config", problems)
    items, count = _override_items(overrides, problems)
    origins, raws = {}, {}
    for key, value, text, raw in items:
        flat[key] = value
        origins[key] = text
        raws[key] = raw
    config = _resolve(flat, origins, raws, problems)
    raise_problems(problems, _source_name(path, count, not isinstance(overrides, dict)))
    return config


def model_config_from_dict(data: dict, source: str = "model config") -> LunarisCodexConfig:
    """Build and validate a LunarisCodexConfig from a plain dict (e.g. stored in a checkpoint)."""
    problems: list = []
    flat = _flatten_file({"model": data}, source, problems)
    config = _resolve(flat, {}, {}, problems, model_only=True)
    raise_problems(problems, source)
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
