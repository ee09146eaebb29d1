"""Configuration: every key is one declared field; loading, overrides and validation.

A key is declared once, on its field: type (a `Literal` lists its choices), default, one-line help and bounds, e.g.
`dropout: float = key(0.0, "Dropout ...", ge=0, lt=1)`. The fields are grouped in sections (architecture,
optimizer, schedule, ...) that only organize the declarations: the YAML keys and attributes stay flat
(`learning_rate:` and `config.learning_rate`; `model: {d_model: ...}` and `config.model.d_model`).

Loading (`load_config`) types and checks every value against its declaration with pydantic, then runs the
cross-field rules (`@rule`), and raises every problem at once in one ConfigError, each sentence naming the key, the
value, and the override that set it. The classes are plain dataclasses: exported `trust_remote_code` models embed
them and run without lunaris and pydantic (pydantic is imported only when a value is checked).
"""

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Literal, Optional

from lunaris.config_fields import (
    VALUE_ERRORS,
    checks,
    field_names,
    hints,
    key,
    read_value,
    rule,
    sentence,
    typed,
    unwrap,
)
from lunaris.config_sources import (
    find_config,
    flatten,
    override_items,
    read_yaml,
    source_name,
    unknown_key,
)
from lunaris.errors import ConfigError, suggest
from lunaris.taskspec import spec_problems

_suggest = suggest  # the name other modules imported before


class _Section:
    """What every config section shares: its problems, found from the declarations and the rules."""

    _prefix = ""  # how keys of this config are written: "model." for the model's

    def problems(self) -> list:
        """Every invalid value, as one sentence each (empty when valid)."""
        return [message for _, message in self.checks()]

    def checks(self, origins=None, defaults=()) -> list:
        """Every invalid value as `(keys involved, sentence)`: each field against its declaration, then the rules.
        `origins` maps a key (`max_steps`, `model.n_heads`) to the override that set it; `defaults` are the keys
        the config left unset (a rule names them as such)."""
        return checks(self, self._prefix, origins or {}, defaults)

    def validate(self):
        raise_problems(self.problems())
        return self


# ---- the model: LunarisCodexConfig ---------------------------------------------------------------------------

@dataclass
class ArchitectureKeys(_Section):
    """Model: architecture (a dense Llama-style transformer)"""

    vocab_size: int = key(
        50304, "Vocabulary size; must be at least the tokenizer's (lunaris prepare prints it).", gt=0)
    d_model: int = key(768, "Width of the residual stream (embedding size).", gt=0)
    n_layers: int = key(12, "Number of transformer blocks.", gt=0)
    n_heads: int = key(12, "Attention (query) heads; must divide d_model, and head_dim must be even.", gt=0)
    n_kv_heads: Optional[int] = key(None, "Key/value heads for GQA; must divide n_heads; null means n_heads.", gt=0)
    max_seq_len: int = key(1024, "Context length: training sequence length and generation limit.", gt=0)
    dropout: float = key(0.0, "Dropout on attention weights, residual branches and collaboration.", ge=0, lt=1)
    rope_theta: float = key(10000.0, "Rotary embedding base.", gt=0)
    norm_eps: float = key(1e-5, "RMSNorm epsilon.", gt=0)
    norm_bias: bool = key(True, "Learnable bias in the pre-attention and pre-FFN RMSNorms.")
    tie_embeddings: bool = key(True, "Share the LM head weight with the token embedding.")
    ffn_hidden_size: Optional[int] = key(
        None, "FFN hidden size; null means ffn_mult*d_model*2/3 (SwiGLU: three matrices) or ffn_mult*d_model "
              "(relu2: two) rounded up to multiple_of.", gt=0)
    ffn_mult: float = key(4.0, "FFN width multiplier used when ffn_hidden_size is null.", gt=0)
    multiple_of: int = key(256, "Round the derived FFN hidden size up to a multiple of this.", gt=0)
    use_gradient_checkpointing: bool = key(
        False, "Recompute each block in the backward pass (less memory, ~30% more compute).")
    n_reasoning_steps: int = key(1, "IRL steps S in every FFN and expert; 1 is a plain SwiGLU.", gt=0)
    irl_alpha: Optional[float] = key(None, "IRL step scale; null means 1/sqrt(n_reasoning_steps).", gt=0)
    irl_halting: Literal["none", "act"] = key(
        "none", "Per-token halting of the IRL steps: act (adaptive computation time) gives every IRL FFN a learned "
                "halting probability per step; a token stops once they sum to 1 - irl_halting_epsilon (at most "
                "n_reasoning_steps), its later updates masked in training and skipped in evaluation; none runs "
                "every step.")
    irl_halting_epsilon: float = key(
        0.01, "With irl_halting: act, a token halts once its halting probabilities sum to at least 1 - this.",
        gt=0, lt=1)
    irl_ponder_weight: float = key(
        1e-2, "With irl_halting: act, weight of the ponder cost (expected IRL steps per token, averaged over IRL "
              "layers) added to the auxiliary loss: larger means fewer steps.", ge=0)

    @property
    def kv_heads(self) -> int:
        return self.n_kv_heads or self.n_heads

    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_heads

    @property
    def ffn_hidden(self) -> int:
        """The FFN hidden size: ffn_hidden_size, else ffn_mult*d_model (times 2/3 for SwiGLU's three matrices, so
        that both MLPs get the parameters of a plain ffn_mult-wide two-matrix MLP) rounded up to multiple_of."""
        if self.ffn_hidden_size:
            return self.ffn_hidden_size
        hidden = int(self.ffn_mult * self.d_model * (2 / 3 if self.mlp == "swiglu" else 1))
        return self.multiple_of * math.ceil(hidden / self.multiple_of)

    @property
    def irl_step_scale(self) -> float:
        return self.irl_alpha if self.irl_alpha is not None else 1.0 / math.sqrt(self.n_reasoning_steps)

    @rule("irl_halting", "n_reasoning_steps")
    def _halting_needs_steps(self, r):
        if self.irl_halting != "none" and self.n_reasoning_steps < 2:
            return (f"{r.ref('irl_halting', 'model.irl_halting: {}')} halts the IRL steps early, but "
                    f"{r.ref('n_reasoning_steps')} leaves none to skip; set n_reasoning_steps >= 2 or "
                    f"irl_halting: none.")

    @rule("d_model", "n_heads")
    def _heads_split_the_width(self, r):
        if self.d_model % self.n_heads:
            return f"{r.ref('d_model')} must be divisible by {r.ref('n_heads')}."
        if self.head_dim % 2:
            return (f"head_dim = {r.ref('d_model')} / {r.ref('n_heads')} = {self.head_dim} must be even for rotary "
                    f"embeddings; change d_model or n_heads.")

    @rule("n_heads", "n_kv_heads")
    def _kv_heads_divide_the_heads(self, r):
        if self.n_kv_heads and self.n_heads % self.n_kv_heads:
            return f"{r.ref('n_heads')} must be divisible by {r.ref('n_kv_heads')}."


@dataclass
class RecipeKeys(_Section):
    """Model: recipe options (off unless a config names them)"""

    qk_norm: bool = key(
        False, "RMSNorm (learnable weight, no bias, per head over head_dim) on queries and keys before rotary "
               "(the Qwen3 layout).")
    zero_init_out: bool = key(
        False, "Initialize the residual output projections (attention proj, FFN and expert down, collaboration "
               "output) to zero, so every block starts as the identity.")
    logit_softcap: Optional[float] = key(
        None, "Soft cap on the logits, cap*tanh(logits/cap) (Gemma 2); null disables.", gt=0)
    attention_mask: Literal["causal", "document"] = key(
        "causal", "document: a token attends only within its own document of a packed row "
                  "(document_separator_id ends a document) and rotary positions restart at each document.")
    document_separator_id: Optional[int] = key(
        None, "End-of-text id that ends a document (attention_mask: document); null means the training data's "
              "end-of-text id (read from its manifest and saved with the checkpoint).", ge=0)
    mlp: Literal["swiglu", "relu2"] = key(
        "swiglu", "Dense FFN: swiglu, down(silu(gate(x))*up(x)); relu2, down(relu(up(x))^2) (nanochat), whose "
                  "derived hidden size is ffn_mult*d_model (see ffn_hidden_size). relu2 is for dense models.")
    value_embeddings: int = key(
        0, "Layers with a value embedding (nanochat's, after ResFormer): a table of n_kv_heads*head_dim per token "
           "added to the layer's attention values through a gate per KV head; N: the last layer and every second "
           "one before it, N of them; 0 disables.", ge=0)
    residual_scalars: bool = key(
        False, "Two learnable scalars per layer: before block i, x = r_i*x + s_i*x0, x0 the token embedding "
               "(modded-nanogpt, nanochat); r_i starts at 1 and s_i at 0, so the model starts as without them.")
    attention_window: Optional[int] = key(
        None, "Sliding-window attention: a token sees only the last N positions, its own included (with "
              "attention_mask: document, of its own document); null means every earlier position.", gt=0)
    attention_window_pattern: Optional[str] = key(
        None, "Which layers use attention_window: S (the window) or L (full context) per layer, the string "
              "repeated over the layers from the first (e.g. SSSL), the last layer always L; null means every "
              "layer.")
    attention_backend: Literal["auto", "flex", "varlen", "mask"] = key(
        "auto", "How document and window masks are computed: flex (a FlexAttention block mask, compiled), varlen "
                "(one SDPA call per document or window chunk), mask (SDPA with a dense mask, T x T per row); auto "
                "picks flex on CUDA, varlen on the CPU, mask under torch.compile on the CPU and elsewhere (README, "
                "Recipe).")

    @property
    def windowed(self) -> bool:
        """Whether some layer has a sliding window."""
        return any(self.layer_window(layer) is not None for layer in range(self.n_layers))

    def layer_window(self, layer: int) -> Optional[int]:
        """The sliding window of layer `layer` (attention_window where attention_window_pattern says S), or None.
        With a pattern the last layer sees the whole context (as nanochat's pattern does), so the output always
        draws on every earlier position."""
        pattern = self.attention_window_pattern
        if pattern and (layer == self.n_layers - 1 or pattern[layer % len(pattern)].upper() == "L"):
            return None
        return self.attention_window

    @rule("attention_window_pattern", "attention_window")
    def _window_pattern(self, r):
        pattern = self.attention_window_pattern
        if pattern is None:
            return None
        if not pattern or set(pattern.upper()) - {"S", "L"}:
            return (f"model.attention_window_pattern must be a string of S (sliding window) and L (full context), "
                    f"one letter per layer, repeated over the layers, e.g. SSSL; {r.got('attention_window_pattern')}.")
        if self.attention_window is None:
            return (f"{r.ref('attention_window_pattern')} chooses the layers of attention_window, which is null; set "
                    f"model.attention_window (the window in tokens), or remove the pattern.")

    @rule("document_separator_id", "vocab_size")
    def _separator_is_a_token(self, r):
        if self.document_separator_id is not None and self.document_separator_id >= self.vocab_size:
            return (f"model.document_separator_id must be a token id in [0, vocab_size), "
                    f"{r.got('document_separator_id')} with {r.ref('vocab_size')}.")

    @property
    def value_embedding_layers(self) -> tuple:
        """The layers with a value embedding (value_embeddings): the last one and every second one before it."""
        return tuple(sorted(range(self.n_layers - 1, -1, -2)[:self.value_embeddings]))

    @rule("value_embeddings", "n_layers")
    def _value_embeddings_every_second_layer(self, r):
        most = (self.n_layers + 1) // 2
        if self.value_embeddings > most:
            return (f"{r.ref('value_embeddings')} is more layers than every second one of {r.ref('n_layers')}; "
                    f"use at most {most}.")

    @rule("mlp", "n_experts")
    def _relu2_is_dense(self, r):
        if self.mlp == "relu2" and self.n_experts:
            return (f"{r.ref('mlp', 'model.mlp: {}')} is for dense models: MoC experts are SwiGLU; remove it, or "
                    f"model.n_experts.")

    def build_problems(self) -> list:
        """Problems that matter only when a model is built from this config: values `lunaris train` fills in
        from the training data (so a training config may leave them null) but a model needs."""
        if self.attention_mask == "document" and self.document_separator_id is None:
            return ["model.attention_mask: document needs document_separator_id (the end-of-text token id that "
                    "ends each document); set model.document_separator_id, or train from a data directory made "
                    "by `lunaris prepare`, whose manifest gives it."]
        return []

    def sized(self):
        """This config, buildable whatever the training data fills in later (a placeholder document separator):
        for counting parameters and timing steps, which do not depend on those values."""
        if self.attention_mask == "document" and self.document_separator_id is None:
            return dataclasses.replace(self, document_separator_id=0)
        return self


@dataclass
class MoCKeys(_Section):
    """Model: MoC layers (mixture of collaborating experts)"""

    n_experts: Optional[int] = key(None, "Experts per MoC layer; null or 0 means a dense model.", ge=0)
    top_k: int = key(2, "Experts each token is routed to.", gt=0)
    expert_hidden_size: Optional[int] = key(
        None, "SwiGLU hidden size of each routed and shared expert (fine-grained experts: many narrow ones, a "
              "larger top_k); null means ffn_hidden_size, the dense FFN's.", gt=0)
    n_shared_experts: int = key(
        0, "Always-on shared experts beside the routed ones (DeepSeekMoE): every token also passes through one "
           "SwiGLU of n_shared_experts*expert_hidden_size, added to the routed output; 0 disables.", ge=0)
    moc_every: int = key(1, "MoC in every n-th layer (layers n-1, 2n-1, ...); dense FFN elsewhere.", gt=0)
    capacity_factor: Optional[float] = key(
        1.25, "Training capacity C = ceil(cf*N*K/E) slots per expert; null means dropless.", gt=0)
    eval_capacity_factor: Optional[float] = key(
        None, "Capacity in eval/generation; null means dropless there.", gt=0)
    aux_loss_weight: float = key(1e-2, "Weight of the load-balancing loss.", ge=0)
    router_z_loss_weight: float = key(1e-3, "Weight of the router z-loss.", ge=0)
    router_jitter: float = key(0.0, "Training-time multiplicative noise on router inputs (0 disables).", ge=0)
    load_balance: Literal["aux_loss", "bias"] = key(
        "aux_loss", "MoC load balancing: aux_loss, the load-balancing loss; or bias, auxiliary-loss-free (a "
                    "per-expert routing bias, moved after each step toward even load; no load-balancing loss).")
    balance_bias_rate: float = key(
        1e-3, "With load_balance: bias, how far each step moves an expert's bias (up if underloaded, down if over).",
        gt=0)
    balance_bias_update: Literal["sign", "proportional"] = key(
        "sign", "With load_balance: bias, each step's bias change: sign, balance_bias_rate times the sign of "
                "(mean load - load); proportional, balance_bias_rate times (mean load - load) / mean load, so "
                "a large imbalance moves the bias fast (short runs; try balance_bias_rate 0.02-0.05).")
    balance_scope: Literal["micro_batch", "global_batch"] = key(
        "micro_batch", "Where the load-balancing loss counts each expert's share f_i of the routed slots: "
                       "micro_batch, in each micro-batch; global_batch, over the optimizer step's micro-batches so "
                       "far and every process (Qwen3), P_i staying per micro-batch.")
    router_temperature: float = key(
        1.0, "Softmax temperature of the router: gates softmax(logits/T) over the selected experts (and the "
             "balance loss's and entropy's full softmax); the top-k choice is unchanged.", gt=0)
    router_temperature_end: Optional[float] = key(
        None, "Anneal the router temperature linearly from router_temperature to this over the run (max_steps); "
              "null keeps it constant.", gt=0)
    router_entropy_weight: float = key(
        0.0, "Weight of the mean entropy of each token's router softmax in the auxiliary loss: positive makes "
             "routing confident (peaked per token), negative spreads it; 0 disables.")
    collab_mode: Optional[Literal["mha", "simple", "none"]] = key(
        None, "Expert collaboration (none is the plain weighted sum of top-k MoE); null follows use_simple_collab "
              "(default mha).")
    use_simple_collab: Optional[bool] = key(None, "Older spelling of collab_mode: true means simple, false means mha.")
    simple_collab_dropout: float = key(0.1, "Dropout inside the simple collaboration MLP.", ge=0, lt=1)
    collab_heads: Optional[int] = key(None, "Heads of the mha collaboration; null means n_heads.", gt=0)
    collab_gate: bool = key(
        False, "Scale the collaboration's change of each expert output by a learned per-channel gate that starts "
               "at 0, so a MoC layer starts as plain top-k MoE and uses collaboration where it helps.")

    @property
    def is_moc(self) -> bool:
        return bool(self.n_experts)

    @property
    def expert_hidden(self) -> int:
        return self.expert_hidden_size or self.ffn_hidden

    @property
    def resolved_collab_mode(self) -> str:
        if self.collab_mode is not None:
            return self.collab_mode
        return "simple" if self.use_simple_collab else "mha"

    def is_moc_layer(self, layer: int) -> bool:
        return self.is_moc and (layer + 1) % self.moc_every == 0

    @rule("top_k", "n_experts")
    def _top_k_of_the_experts(self, r):
        if self.n_experts and self.top_k > self.n_experts:
            return f"{r.ref('top_k')} must be <= {r.ref('n_experts')}."

    @rule("use_simple_collab", "collab_mode")
    def _one_collaboration(self, r):
        implied = {True: "simple", False: "mha", None: self.collab_mode}[self.use_simple_collab]
        if self.collab_mode is not None and implied != self.collab_mode:
            return (f"{r.ref('use_simple_collab', 'model.use_simple_collab={}')} contradicts "
                    f"{r.ref('collab_mode', 'model.collab_mode={!r}')}; remove one of the two.")

    @rule("balance_scope", "load_balance")
    def _scope_of_the_balance_loss(self, r):
        if self.balance_scope != "micro_batch" and self.load_balance == "bias":
            return (f"{r.ref('balance_scope', 'model.balance_scope: {}')} sets where the load-balancing loss counts "
                    f"the load, but {r.ref('load_balance', 'model.load_balance: {}')} has no such loss; remove one "
                    f"of the two.")

    @rule("d_model", "collab_heads")
    def _collab_heads_divide_the_width(self, r):
        if self.collab_heads and self.d_model % self.collab_heads:
            return f"{r.ref('d_model')} must be divisible by {r.ref('collab_heads')}."


# the fields come in the order architecture, recipe, MoC: a dataclass lists its bases' fields from the last base
@dataclass
class LunarisCodexConfig(MoCKeys, RecipeKeys, ArchitectureKeys):
    """Model architecture. Dense Llama-style by default; `n_experts >= 1` turns on MoC layers."""

    _prefix = "model."


# ---- training: TrainConfig -----------------------------------------------------------------------------------

@dataclass
class ModelKey(_Section):
    """The model (`model:`)"""

    model: LunarisCodexConfig = field(default_factory=LunarisCodexConfig,
                                      metadata={"help": "The model architecture (see above)."})


@dataclass
class DataKeys(_Section):
    """Data and batches"""

    data_dir: str = key(
        "data/", "Training shards: a directory made by `lunaris prepare`, or a flat directory of .npy shards.")
    val_data_dir: Optional[str] = key(
        None, "Held-out shards; null means the `val/` split of a prepared data_dir, if any.")
    batch_size: int = key(16, "Sequences per micro-batch per process.", gt=0)
    gradient_accumulation_steps: int = key(
        1, "Micro-batches per optimizer step (effective batch = batch_size x world size x this).", gt=0)
    num_workers: int = key(2, "DataLoader worker processes.", ge=0)
    pin_memory: bool = key(True, "Pin host memory for faster host-to-GPU copies.")
    persistent_workers: bool = key(True, "Keep DataLoader workers alive between epochs.")
    prefetch_factor: int = key(2, "Batches each worker loads ahead.", gt=0)


@dataclass
class OptimizerKeys(_Section):
    """Optimizer"""

    optimizer: Literal["adamw", "muon"] = key(
        "adamw", "muon: Muon (orthogonalized momentum) for the hidden matrices of the blocks and each expert matrix, "
                 "AdamW for embeddings, LM head, norms, biases and the router; adamw: AdamW for everything.")
    learning_rate: float = key(
        3e-4, "Peak learning rate (after warmup) of AdamW (with muon: of the AdamW groups).", gt=0)
    muon_lr: float = key(
        0.02, "Peak learning rate of the Muon groups (optimizer: muon); follows the same schedule.", gt=0)
    muon_momentum: float = key(0.95, "Muon momentum (Nesterov).", ge=0, lt=1)
    weight_decay: float = key(0.1, "AdamW weight decay on >=2-D weights (not norms, biases or the router).", ge=0)
    beta1: float = key(0.9, "AdamW beta1.", ge=0, lt=1)
    beta2: float = key(0.95, "AdamW beta2.", ge=0, lt=1)
    muon_ns_coefficients: Literal["torch", "polar_express"] = key(
        "torch", "Muon's orthogonalization: torch, five Newton-Schulz steps with torch.optim.Muon's coefficients; "
                 "polar_express, the Polar Express coefficients, one set per step (Amsel et al. 2025, nanochat).")
    muon_lr_scaling: Literal["shape", "spectral", "rms"] = key(
        "shape", "Muon's step per matrix (out x in): shape, muon_lr*sqrt(max(1, out/in)) (torch.optim.Muon, "
                 "nanochat); spectral, muon_lr*sqrt(out/in); rms, muon_lr*0.2*sqrt(max(out, in)) (Moonlight: "
                 "AdamW's update size, so muon_lr near learning_rate).")
    router_lr_scale: float = key(0.5, "Learning-rate multiplier of the MoC router parameters.", ge=0)
    embedding_lr: Optional[float] = key(
        None, "Peak learning rate of the token embedding and the value embeddings (an AdamW group of their own); "
              "null: learning_rate.", gt=0)
    lm_head_lr: Optional[float] = key(
        None, "Peak learning rate of an untied LM head (model.tie_embeddings: false; an AdamW group of its own); "
              "null: learning_rate.", gt=0)
    scalar_lr: Optional[float] = key(
        None, "Peak learning rate of the residual scalars (model.residual_scalars; an AdamW group of their own, no "
              "weight decay); null: learning_rate.", gt=0)
    grad_clip: float = key(1.0, "Clip the global gradient norm to this (0 disables).", ge=0)

    @rule("lm_head_lr")
    def _lm_head_lr_needs_its_own_head(self, r):
        if self.lm_head_lr is not None and self.model.tie_embeddings:
            return (f"{r.ref('lm_head_lr')} is the learning rate of an untied LM head, and model.tie_embeddings is "
                    f"true (the head is the embedding: set embedding_lr); set model.tie_embeddings: false, or "
                    f"remove lm_head_lr.")

    @rule("scalar_lr")
    def _scalar_lr_needs_scalars(self, r):
        if self.scalar_lr is not None and not self.model.residual_scalars:
            return (f"{r.ref('scalar_lr')} is the learning rate of the residual scalars, and "
                    f"model.residual_scalars is false; set model.residual_scalars: true, or remove scalar_lr.")

@dataclass
class ScheduleKeys(_Section):
    """Schedule: steps and learning rate over time"""

    max_steps: int = key(200000, "Total optimizer steps.", gt=0)
    warmup_steps: int = key(
        2000, "Linear warmup steps (more than max_steps is allowed: a short trial run of a long config ends "
              "during warmup).", ge=0)
    lr_schedule: Literal["cosine", "wsd", "linear"] = key(
        "cosine", "After warmup: cosine or linear decay to min_lr over the run; wsd holds the peak, then decays "
                  "linearly to min_lr over the last decay_fraction of max_steps.")
    decay_fraction: float = key(0.2, "Share of max_steps spent decaying with lr_schedule: wsd.", gt=0, le=1)
    min_lr: Optional[float] = key(None, "Final learning rate of the decay; null means learning_rate/10.", ge=0)
    max_train_seconds: Optional[float] = key(
        None, "Training-time budget (seconds in training steps, as time/train_seconds counts): the run stops after "
              "the step that reaches it (or at max_steps), and after warmup the schedule decays over the time, not "
              "the steps (wsd over its last decay_fraction); null: max_steps alone.", gt=0)

    @property
    def resolved_min_lr(self) -> float:
        return self.min_lr if self.min_lr is not None else self.learning_rate / 10

    @rule("min_lr", "learning_rate")
    def _min_lr_below_the_peak(self, r):
        if self.min_lr is not None and self.min_lr > self.learning_rate:
            return f"{r.ref('min_lr')} must be between 0 and {r.ref('learning_rate')}."


@dataclass
class CheckpointKeys(_Section):
    """Checkpoints"""

    out_dir: str = key("checkpoints/run", "Run directory: checkpoints, metrics.jsonl, resolved config.")
    save_interval: int = key(1000, "Save a checkpoint every N steps (and always at the end).", gt=0)
    save_latest_always: bool = key(
        True, "Update latest_checkpoint.pt at every save (false: only at the end and on preemption).")
    keep_last: int = key(3, "Numbered checkpoints ckpt_<step>.pt to keep (0 keeps all).", ge=0)
    init_from: Optional[str] = key(
        None, "Start from the weights of this checkpoint (file or run directory) instead of random ones: fine-tuning "
              "or continued pre-training, with a fresh optimizer, schedule and step count; ignored once out_dir has "
              "checkpoints of its own. A vocabulary grown since (chat tokens) gets new rows = the mean embedding.")


@dataclass
class LoggingKeys(_Section):
    """Logging and evaluation"""

    log_interval: int = key(20, "Log metrics every N steps.", gt=0)
    eval_interval: int = key(1000, "Evaluate on held-out data every N steps (0 disables).", ge=0)
    eval_batches: int = key(20, "Held-out batches per evaluation.", gt=0)
    eval_tasks: list = key(
        [], "Downstream tasks scored at every evaluation (eval/<task>/acc): embedded, NAME=PATH, or {name, path, "
            "limit} items; see the README, Evaluate.")
    peak_flops: Optional[float] = key(None, "Peak FLOP/s per device for MFU; null means a table of known GPUs.", gt=0)
    wandb_project: Optional[str] = key(None, "W&B project; null disables W&B.")
    wandb_run_name: Optional[str] = key(None, "W&B run name.")
    wandb_entity: Optional[str] = key(None, "W&B entity (team).")
    tensorboard: bool = key(False, "Also write TensorBoard event files to out_dir/tensorboard.")

    @rule("eval_tasks")
    def _tasks_are_task_entries(self, r):
        return [f"eval_tasks: {problem}" for problem in spec_problems(self.eval_tasks)]


@dataclass
class RuntimeKeys(_Section):
    """Runtime: device, precision, parallelism"""

    device: Literal["auto", "cuda", "cpu", "mps"] = key("auto", "Where to train; auto is CUDA, then MPS, then CPU.")
    dtype: Literal["auto", "bf16", "fp16", "fp32"] = key(
        "auto", "Autocast precision (master weights stay fp32); auto is bf16 on capable GPUs, fp32 on CPU.")
    parallelism: Literal["ddp", "fsdp"] = key(
        "ddp", "With several processes: ddp keeps a whole model on each; fsdp shards it (FSDP2 fully_shard per block).")
    compile_model: bool = key(False, "torch.compile the model (falls back to eager with a warning if it fails).")
    seed: int = key(1337, "Seed for initialization, data order and dropout.")
    max_bad_steps: int = key(
        10, "Stop after this many consecutive non-finite losses (each one skips its update).", gt=0)


# the sections read bottom-up here: a dataclass lists its bases' fields from the last base to the first
@dataclass
class TrainConfig(RuntimeKeys, LoggingKeys, CheckpointKeys, ScheduleKeys, OptimizerKeys, DataKeys, ModelKey):
    """Training run: the model, data, optimizer, schedule, checkpoints, logging and runtime."""

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict, source: str = "config") -> "TrainConfig":
        problems: list = []
        config = _resolve(flatten(data, source, problems), {}, {}, problems, cls)
        raise_problems(problems, source)
        return config


def raise_problems(problems: list, source: str = "config") -> None:
    """Raise one ConfigError listing every problem (nothing when the list is empty)."""
    if problems:
        lines = "\n".join(f"  - {p}" for p in problems)
        n = len(problems)
        raise ConfigError(f"{source} has {n} problem{'s' if n > 1 else ''}:\n{lines}", problems)


# ---- loading -------------------------------------------------------------------------------------------------
#
# A config is resolved in one pass that never stops early: the file and the overrides are flattened to
# `{"model.d_model": ..., "max_steps": ...}`, every key is looked up and typed, the config is built from the values
# that could be typed (defaults stand in for the others), and its checks run. Every problem found on the way goes
# into one ConfigError; a rule that involves a key whose value could not be typed is left out (it would judge a
# default).

def _resolve(flat: dict, origins: dict, raws: dict, problems: list, train_cls=None):
    """Type, build and check a TrainConfig (`train_cls`), or a model config alone; problems go into `problems`."""
    classes = {"model.": LunarisCodexConfig, "": train_cls}
    values, invalid = {"model.": {}, "": {}}, set()
    for dotted, value in flat.items():
        prefix = "model." if dotted.startswith("model.") else ""
        cls, name = classes[prefix], dotted[len(prefix):]
        if cls is None or name not in field_names(cls):
            problems.append(unknown_key(dotted, origins.get(dotted), field_names(LunarisCodexConfig),
                                        field_names(train_cls) if train_cls else ()))
            continue
        value, error = typed(cls, name, read_value(hints(cls)[name], value, raws.get(dotted)))
        if error and error["type"] not in VALUE_ERRORS:  # the wrong type: its default stands in
            problems.append(sentence(cls, name, dotted, error, origins.get(dotted)))
            invalid.add(dotted)
        else:  # a value out of bounds or choices is reported by the checks, in order with the rules
            values[prefix][name] = value
    config = LunarisCodexConfig(**values["model."])
    if train_cls is not None:
        config = train_cls(model=config, **values[""])
    unset = {f"model.{n}" for n in field_names(LunarisCodexConfig)} | set(field_names(train_cls) if train_cls else ())
    problems.extend(message for keys, message in config.checks(origins, unset - set(flat))
                    if invalid.isdisjoint(keys))
    return config


def load_config(path=None, overrides=None) -> TrainConfig:
    """Read a YAML config (the format shown in the README) or a preset by name (`dense-124m`), apply overrides,
    validate, and return a TrainConfig.

    `overrides` is a list like `['--learning_rate=1e-3', '--model.n_layers=4']` or a dict
    like `{'learning_rate': 1e-3, 'model.n_layers': 4}`; values are typed from the field.
    Every problem (unknown keys, wrong types, invalid values and combinations, malformed
    overrides) is raised together in one ConfigError; a problem with a value that came from an
    override names that override.
    """
    file, source = find_config(path) if path is not None else (None, None)
    problems: list = []
    flat = flatten(read_yaml(file) if file else {}, source or "config", problems)
    items, count = override_items(overrides, problems)
    origins, raws = {}, {}
    for dotted, value, text, raw in items:
        flat[dotted], origins[dotted], raws[dotted] = value, text, raw
    config = _resolve(flat, origins, raws, problems, TrainConfig)
    raise_problems(problems, source_name(source, count, not isinstance(overrides, dict)))
    return config


def model_config_from_dict(data: dict, source: str = "model config") -> LunarisCodexConfig:
    """Build and validate a LunarisCodexConfig from a plain dict (e.g. stored in a checkpoint)."""
    problems: list = []
    config = _resolve(flatten({"model": data}, source, problems), {}, {}, problems)
    raise_problems(problems, source)
    return config


def parse_overrides(overrides) -> dict:
    """`['--learning_rate=1e-3', '--model.n_layers', '4']` or a dict -> nested dict of YAML-typed values."""
    problems: list = []
    items, _ = override_items(overrides, problems)
    raise_problems(problems, "the overrides")
    nested: dict = {}
    for dotted, value, _, _ in items:
        *sections, name = dotted.split(".")
        target = nested
        for section in sections:
            if not isinstance(target.get(section), dict):
                target[section] = {}
            target = target[section]
        target[name] = value
    return nested


# ---- documentation -------------------------------------------------------------------------------------------

def choices(dotted: str) -> tuple:
    """The declared choices of a key, e.g. for a command-line option: `choices("dtype")` -> ('auto', 'bf16',
    'fp16', 'fp32'); `choices("model.collab_mode")`; () for a key without choices."""
    model_key = dotted.startswith("model.")
    cls, name = (LunarisCodexConfig, dotted[len("model."):]) if model_key else (TrainConfig, dotted)
    if name not in field_names(cls):
        raise KeyError(f"no config key {dotted!r}")
    return unwrap(hints(cls)[name])[2]


def field_docs(cls) -> list:
    """(name, default, help) for every field, for the README reference and `lunaris config --reference`."""
    rows = []
    for f in dataclasses.fields(cls):
        if f.name == "model":
            continue
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        rows.append((f.name, default, f.metadata.get("help", "")))
    return rows


# the choice tuples earlier versions exported, read from the declarations
COLLAB_MODES, LOAD_BALANCES, ATTENTION_MASKS = (choices(f"model.{k}") for k in ("collab_mode", "load_balance",
                                                                               "attention_mask"))
DEVICES, DTYPES, PARALLELISMS, OPTIMIZERS, LR_SCHEDULES = (choices(k) for k in ("device", "dtype", "parallelism",
                                                                                 "optimizer", "lr_schedule"))
