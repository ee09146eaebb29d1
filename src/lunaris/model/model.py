"""LunarisCodex: a decoder-only transformer, dense (Llama-style) or MoC (mixture of collaborating experts).

Read top to bottom: Block (pre-norm attention + pre-norm FFN), then the model (embedding, blocks,
final norm, tied LM head; with the recipe options, value embeddings and residual scalars), its loss, the one-token
decode step (generation.py runs the decoding loop), FLOP count, what training asks of it (hooks, analysis, AdamW
groups from param_groups.py); last, `model_from_checkpoint` (the model a checkpoint describes). Single-device
code: parallelism, training compilation and precision are applied from outside (lunaris.train).
"""

from typing import NamedTuple, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from lunaris.config import LunarisCodexConfig, raise_problems
from lunaris.metrics import IRL_PONDER
from lunaris.model.attention import CausalSelfAttention, KVCache, decode_linear
from lunaris.model.generation import decode_compile_options, generate_tokens, stream_tokens
from lunaris.model.initialization import initialize
from lunaris.model.layers import (
    IRLProbe,
    ReasoningFeedForward,
    ReluSquared,
    ResidualScalars,
    RMSNorm,
    RotaryEmbedding,
    ValueGate,
    irl_iterate,
)
from lunaris.model.masking import attention_plan, document_mask  # noqa: F401 (document_mask: its older home)
from lunaris.model.moc import MoCLayer, moc_training_hooks
from lunaris.model.param_groups import adamw


class ModelOutput(NamedTuple):
    logits: torch.Tensor            # (B, T, vocab)
    loss: Optional[torch.Tensor]    # main_loss + aux_loss, or None without targets
    main_loss: Optional[torch.Tensor]  # cross-entropy over targets != -1
    aux_loss: torch.Tensor          # MoC auxiliary losses averaged over MoC layers (0 for dense), + the IRL ponder cost
    metrics: dict                   # detached tensors: expert utilization, drop rates, IRL update norms


def make_ffn(config: LunarisCodexConfig, layer: int) -> nn.Module:
    """Dense IRL FFN, or a MoC layer where config.is_moc_layer(layer). Both return (y, aux, stats)."""
    if config.is_moc_layer(layer):
        return MoCLayer(config, layer)
    return ReasoningFeedForward(config)


class Block(nn.Module):
    def __init__(self, config: LunarisCodexConfig, layer: int):
        super().__init__()
        self.attn_norm = RMSNorm(config.d_model, config.norm_eps, bias=config.norm_bias)
        self.attn = CausalSelfAttention(config, config.layer_window(layer))
        # value_embeddings: how much of the layer's value embedding (`ve`, looked up by the model) each KV head takes
        self.value_gate = ValueGate(config.d_model, config.kv_heads) if layer in config.value_embedding_layers else None
        self.ffn_norm = RMSNorm(config.d_model, config.norm_eps, bias=config.norm_bias)
        self.ffn = make_ffn(config, layer)
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x, cos, sin, cache: KVCache = None, start: int = 0, mask=None, ve: torch.Tensor = None):
        h = self.attn_norm(x)                                                                # (B, T, D)
        ve = None if ve is None else self.value_gate(h, ve)                                  # (B, T, Hkv*hd)
        x = x + self.dropout(self.attn(h, cos, sin, cache, start, mask, ve))
        y, aux, stats = self.ffn(self.ffn_norm(x))
        return x + self.dropout(y), aux, stats

    def decode(self, x, cos, sin, cache: KVCache, slot: torch.Tensor, mask: torch.Tensor = None,
               length: int = None, ve: torch.Tensor = None):
        """One new token per row, static shapes (CausalSelfAttention.decode); eval only: no dropout, no aux."""
        h = self.attn_norm(x)                                                                # (B, 1, D)
        ve = None if ve is None else self.value_gate(h, ve)
        x = x + self.attn.decode(h, cos, sin, cache, slot, mask, length, ve)
        return x + decode_ffn(self.ffn, self.ffn_norm(x))


def decode_ffn(ffn: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """A block's FFN output for a decode step: the dense IRL FFN through `decode_linear`, a MoC layer as in forward.

    The dense path computes what ReasoningFeedForward and its MLP (SwiGLU or relu²) compute (eager: the same
    operations, so the same bits); under torch.compile on CPU its products become the weight-streaming loops of
    `decode_linear`.
    """
    if not isinstance(ffn, ReasoningFeedForward):
        return ffn(x)[0]                                       # MoC: (y, aux, stats); dropless in eval mode
    mlp = ffn.ffn
    if isinstance(mlp, ReluSquared):
        def step(z):
            return decode_linear(F.relu(decode_linear(z, mlp.up.weight)).square(), mlp.down.weight)
    else:
        w_gate, w_up = mlp.gate_up.weight.chunk(2, dim=0)      # (H, D) each

        def step(z):
            return decode_linear(F.silu(decode_linear(z, w_gate)) * decode_linear(z, w_up), mlp.down.weight)

    return irl_iterate(step, x, ffn.steps, ffn.alpha, halting=ffn.halting, ffn_rows=lambda z, rows: step(z))


def soft_cap(logits: torch.Tensor, cap: Optional[float]) -> torch.Tensor:
    """cap·tanh(logits/cap), computed in fp32 and returned in the logits' dtype (logit_softcap); None: unchanged."""
    if cap is None:
        return logits
    return (cap * torch.tanh(logits.float() / cap)).to(logits.dtype)


class LunarisCodex(nn.Module):
    def __init__(self, config: LunarisCodexConfig):
        super().__init__()
        raise_problems(config.problems() + config.build_problems(), "model config")
        self.config = config
        device = torch.get_default_device()
        with torch.device("meta"):  # built without drawing a number: init_weights below draws each weight once
            self.wte = nn.Embedding(config.vocab_size, config.d_model)
            # value_embeddings: one more token embedding per chosen layer, of the layer's value width (empty: none)
            self.value_embeds = nn.ModuleDict({str(layer): nn.Embedding(config.vocab_size, config.kv_heads *
                                                                        config.head_dim)
                                               for layer in config.value_embedding_layers})
            self.rotary = RotaryEmbedding(config.head_dim, config.max_seq_len, config.rope_theta)
            self.blocks = nn.ModuleList(Block(config, layer) for layer in range(config.n_layers))
            self.residual_scalars = ResidualScalars(config.n_layers) if config.residual_scalars else None
            self.norm = RMSNorm(config.d_model, config.norm_eps, bias=False)
            self.lm_head = nn.Linear(config.d_model, config.vocab_size, bias=False)
        self.to_empty(device=device)  # storage on the default device (the rotary tables are computed there)
        if config.tie_embeddings:
            self.lm_head.weight = self.wte.weight
        self.init_weights()

    # ---- initialization ----
    def init_weights(self) -> None:
        """Draw every weight once, in the order of `named_parameters`: Normal(0, 0.02); residual output projections
        0.02/sqrt(2·n_layers) (zero with zero_init_out); norms weight 1, bias 0 (initialization.py)."""
        initialize(self, self.config)

    reset_parameters = init_weights   # the older name

    # ---- forward ----
    def forward(self, idx: torch.Tensor, targets: torch.Tensor = None, caches: list = None, start: int = 0,
                last_logits_only: bool = False, positions: torch.Tensor = None, attn_mask: torch.Tensor = None):
        """idx (B, T) token ids; targets (B, T) with -1 ignored; caches/start for cached decoding.

        `last_logits_only` computes logits for the last position only (B, 1, vocab): decoding needs just
        the next-token distribution, not a (T, vocab) LM-head product over the whole prompt.
        Left-padded prompts (generation) pass `positions` (B, T), each token's rotary position, and
        `attn_mask` (B, 1, T, T) bool, True where a query may see a key, instead of the causal mask.
        Without caches, positions and attn_mask, attention follows the config (masking.py): with attention_mask:
        document each row is a pack of documents, a token sees only its own document, at rotary positions from 0;
        a layer with a sliding window sees only the last attention_window positions.
        """
        B, T = idx.shape
        if start + T > self.config.max_seq_len:
            raise ValueError(f"sequence of {start + T} tokens exceeds max_seq_len={self.config.max_seq_len}")
        if caches is None and start == 0 and positions is None and attn_mask is None:
            plan = attention_plan(idx, self.config, dropout=self.training and self.config.dropout > 0)
            if plan is not None:
                positions, attn_mask = plan.positions, plan             # the plan replaces the causal mask
        if positions is None:
            cos, sin = self.rotary(start, T)                   # (T, hd) each, fp32
        else:
            cos, sin = self.rotary.cos[positions].unsqueeze(1), self.rotary.sin[positions].unsqueeze(1)  # (B, 1, T, hd)
        x = x0 = self.wte(idx)                                 # (B, T, D)
        aux_losses, layer_stats = [], []
        for i, block in enumerate(self.blocks):
            cache = caches[i] if caches is not None else None
            x, ve = self.mix_embedding(i, x, x0), self.value_embedding(i, idx)   # (B, T, D), (B, T, Hkv*hd) or None
            if self.config.use_gradient_checkpointing and self.training and torch.is_grad_enabled():
                x, aux, stats = checkpoint(block, x, cos, sin, cache, start, attn_mask, ve, use_reentrant=False)
            else:
                x, aux, stats = block(x, cos, sin, cache, start, attn_mask, ve)
            if aux is not None:
                aux_losses.append(aux)
            layer_stats.append(stats)
        if last_logits_only:
            if targets is not None:
                raise ValueError("last_logits_only=True cannot compute a loss over targets")
            x = x[:, -1:]                                      # (B, 1, D)
        logits = soft_cap(self.lm_head(self.norm(x)), self.config.logit_softcap)  # (B, T, vocab)
        aux_loss = torch.stack(aux_losses).mean() if aux_losses else torch.zeros((), device=idx.device)
        metrics = merge_stats(layer_stats)
        if IRL_PONDER in metrics:  # irl_halting: the ponder cost averaged over IRL layers, the one metric with a grad
            aux_loss = aux_loss + self.config.irl_ponder_weight * metrics[IRL_PONDER]
            metrics[IRL_PONDER] = metrics[IRL_PONDER].detach()
        main_loss = loss = None
        if targets is not None:
            main_loss = self.cross_entropy(logits, targets)
            loss = main_loss + aux_loss
        return ModelOutput(logits, loss, main_loss, aux_loss, metrics)

    def mix_embedding(self, layer: int, x: torch.Tensor, x0: torch.Tensor) -> torch.Tensor:
        """The residual stream block `layer` reads: x itself, or with residual_scalars r·x + s·x0 (x0 the token
        embedding, (B, T, D))."""
        return x if self.residual_scalars is None else self.residual_scalars(layer, x, x0)

    def value_embedding(self, layer: int, idx: torch.Tensor):
        """(B, T, Hkv·hd) value embedding of the tokens for block `layer` (value_embeddings), or None."""
        table = self.value_embeds[str(layer)] if str(layer) in self.value_embeds else None
        return None if table is None else table(idx)

    @staticmethod
    def cross_entropy(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """Mean cross-entropy over targets != -1 (0, not NaN, when every target is ignored)."""
        flat_targets = targets.reshape(-1)
        total = F.cross_entropy(logits.reshape(-1, logits.size(-1)).float(), flat_targets,
                                ignore_index=-1, reduction="sum")
        return total / (flat_targets != -1).sum().clamp_min(1)

    # ---- what training asks of the model ----
    def training_hooks(self) -> list:
        """Model-specific work around each optimizer step, for a training loop that names no layer type.

        Each hook has `before_step(progress, all_reduce_sum)` (before the step's first micro-batch; `progress` is
        the step's index over max_steps, None when the caller does not know it) and `after_update(applied,
        all_reduce_sum)` (right after the optimizer update, `applied` False when it was skipped; `all_reduce_sum`
        sums a tensor over processes in place, the identity in one process). Today, MoC layers (moc.py): with
        load_balance: bias they move their routing bias by the step's expert load (ExpertBalance); with
        balance_scope: global_batch they count the load over the step and processes (GlobalBalance); with
        router_temperature_end they anneal the router temperature by the step's progress (RouterSchedule).
        """
        return moc_training_hooks(self)

    def analysis(self) -> IRLProbe:
        """The analysis metrics of one training step (the trainer's log steps): a context manager around the step's
        forward and backward passes; `metrics(loss_scale)` of what it returns gives them afterwards. Today: the
        IRL update cosines (in the model's metrics) and the gradient norms of the IRL states (layers.IRLProbe)."""
        return IRLProbe(self)

    # ---- generation ----
    def new_kv_caches(self, batch: int, length: int) -> list:
        """One preallocated KVCache per layer for `length` positions, at n_kv_heads (the GQA memory saving)."""
        c, weight = self.config, self.wte.weight
        return [KVCache(batch, c.kv_heads, length, c.head_dim, weight.device, weight.dtype) for _ in self.blocks]

    def decode_step(self, token: torch.Tensor, slot: torch.Tensor, caches: list, pad: torch.Tensor = None,
                    key_ok: torch.Tensor = None, length: int = None) -> torch.Tensor:
        """Next-token logits (B, vocab) after one new token per row: the step torch.compile captures once.

        token (B, 1) ids go to cache position `slot`, a (1,) long tensor shared by the batch (prompts are
        left-padded so that every row's newest token is at the same position). `pad` (B, 1) long: each row's
        left padding, so row b is at rotary position slot - pad[b], exactly where it would be alone; None when
        nothing is padded. `key_ok` (B, S) bool: cache positions that are not padding. `length` (eager only):
        attend over the first `length` positions (slot + 1); None (the static shape) attends over the whole
        cache, the positions after `slot` masked. No shape depends on the step and nothing is allocated per
        step but activations: the cache is written in place, the position is a tensor, and the LM head sees one
        position per row.
        """
        if pad is None:
            cos, sin = self.rotary.cos[slot], self.rotary.sin[slot]                      # (1, hd)
        else:
            position = slot - pad                                                         # (B, 1)
            cos, sin = self.rotary.cos[position].unsqueeze(1), self.rotary.sin[position].unsqueeze(1)  # (B, 1, 1, hd)
        if length is not None:
            mask = None if key_ok is None else key_ok[:, None, None, :length]            # (B, 1, 1, length)
        else:
            written = torch.arange(caches[0].k.shape[2], device=slot.device) <= slot     # (S,)
            mask = written.view(1, 1, 1, -1) if key_ok is None else (written & key_ok)[:, None, None, :]
        x = x0 = self.wte(token)                                                          # (B, 1, D)
        for i, (block, cache) in enumerate(zip(self.blocks, caches)):
            x = block.decode(self.mix_embedding(i, x, x0), cos, sin, cache, slot, mask, length,
                             self.value_embedding(i, token))
        logits = decode_linear(self.norm(x), self.lm_head.weight)[:, -1]                # (B, vocab)
        return soft_cap(logits, self.config.logit_softcap)

    @torch.no_grad()
    def generate(self, idx, max_new_tokens: int, temperature: float = 1.0, top_k: int = None, top_p: float = None,
                 eos_token_id: int = None, generator: torch.Generator = None, *, compile=None, stats: dict = None):
        """Continue prompts: a (B, T) tensor -> (B, T + n), or a list of prompts of any lengths -> a list of 1-D
        tensors. temperature 0 is greedy; top_k / top_p restrict sampling. See `generation.generate_tokens`."""
        return generate_tokens(self, idx, max_new_tokens, temperature, top_k, top_p, eos_token_id, generator,
                                   compile=compile, stats=stats)

    @torch.no_grad()
    def generate_stream(self, idx, max_new_tokens: int, temperature: float = 1.0, top_k: int = None,
                        top_p: float = None, eos_token_id: int = None, generator: torch.Generator = None, *,
                        compile=None, stats: dict = None):
        """Yield the next token of every row, (B, 1), one step at a time. See `generation.stream_tokens`."""
        yield from stream_tokens(self, idx, max_new_tokens, temperature, top_k, top_p, eos_token_id,
                                              generator, compile=compile, stats=stats)

    def decode_compile_options(self, compile, steps: int):
        """torch.compile options of the decode step, or None for eager. See `generation.decode_compile_options`."""
        return decode_compile_options(self, compile, steps)

    def _decode_device_type(self) -> str:
        return self.wte.weight.device.type

    # ---- accounting ----
    def num_params(self, exclude_embedding: bool = False) -> int:
        """Unique parameters (a tied LM head counts once); `exclude_embedding` leaves out the token embedding and
        the value embeddings (lookups, not products)."""
        n = sum(p.numel() for p in self.parameters())
        embeddings = self.wte.weight.numel() + sum(table.weight.numel() for table in self.value_embeds.values())
        return n - embeddings if exclude_embedding else n

    def flops_per_token(self, seq_len: int = None) -> float:
        """Training FLOPs per token (forward + backward): 6·(active matmul weights) + 12·Hq·hd·T per layer (attention),
        T capped at the layer's sliding window.

        Counts what each token actually multiplies through: IRL steps repeat the FFN, MoC tokens go
        through top_k experts (the PaLM appendix-B formula, with active instead of total weights).
        """
        c = self.config
        T = seq_len or c.max_seq_len
        matmul = c.d_model * c.vocab_size  # LM head
        context = 0  # keys per query summed over layers
        for block in self.blocks:
            matmul += block.attn.qkv.weight.numel() + block.attn.proj.weight.numel()
            matmul += block.ffn.matmul_params_per_token()
            matmul += block.value_gate.proj.weight.numel() if block.value_gate is not None else 0
            context += T if block.attn.window is None else min(T, block.attn.window)
        return 6.0 * matmul + 12.0 * c.n_heads * c.head_dim * context

    # ---- optimizer ----
    def configure_optimizers(self, weight_decay: float, learning_rate: float, betas=(0.9, 0.95),
                             device_type: str = "cpu", router_lr_scale: float = 0.5, exclude=frozenset()):
        """AdamW with groups decay (>=2-D weights), no_decay (norms, biases), router (no decay, lr_scale): the same
        optimizer `optimizer: adamw` trains with. A thin alias of `param_groups.adamw` (which parameter is which
        kind: model/param_groups.py); every group carries `lr_scale`, and parameters whose id() is in `exclude`
        are left out."""
        return adamw(self, weight_decay, learning_rate, betas, device_type, router_lr_scale, exclude)

    @classmethod
    def from_checkpoint(cls, path, device="cpu") -> "LunarisCodex":
        """The model a checkpoint describes, with its weights, in eval mode on `device`: `model_from_checkpoint`."""
        return model_from_checkpoint(path, device)


def merge_stats(layer_stats: list) -> dict:
    """Merge per-layer metric dicts; a key reported by several layers (IRL norms) is averaged."""
    merged: dict = {}
    for stats in layer_stats:
        for key, value in stats.items():
            merged.setdefault(key, []).append(value)
    return {key: values[0] if len(values) == 1 else torch.stack(values).mean() for key, values in merged.items()}


def build_on_meta(config: LunarisCodexConfig) -> LunarisCodex:
    """The model on the meta device: no memory allocated, no weights drawn (parameter and FLOP counts at any size).
    Values the training data fills in later (a document separator) get a placeholder (`config.sized()`)."""
    with torch.device("meta"):
        return LunarisCodex(config.sized())


def model_from_checkpoint(path, device="cpu") -> LunarisCodex:
    """Build the model a checkpoint describes and load its weights, in eval mode, on `device`.

    `path` is a checkpoint file (ckpt_<step>.pt, latest_checkpoint.pt), an FSDP checkpoint directory, or a run
    directory (its newest checkpoint). The optimizer state is never read. Raises CheckpointError for a missing or
    unreadable file, or weights that do not fit the config.
    """
    # imported here: the exported modeling code is this file, and a Hugging Face model reads no Lunaris checkpoint
    from lunaris.checkpoints import read_model_checkpoint
    from lunaris.errors import CheckpointError
    path, config, weights = read_model_checkpoint(path)
    model = LunarisCodex(config)
    try:
        model.load_state_dict(weights)
    except RuntimeError as exc:
        detail = " ".join(str(exc).split())[:800]  # torch lists every missing/unexpected/mis-sized key
        raise CheckpointError(
            f"the weights in {path} do not fit the model config stored with them ({detail}). The file was "
            f"edited or written by another program; use a checkpoint saved by `lunaris train`.") from None
    return model.to(device).eval()
