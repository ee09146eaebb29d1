"""Metric names: written once here, used by the model that reports them and by every tool that reads them back.

The same names appear on the console, in metrics.jsonl, W&B and TensorBoard. Per-layer and per-step names are
templates (`experts/util_layer{layer}/e{expert}`); `match(template, name)` reads the numbers back out of a name, so
a plot or a sweep report never writes its own regular expression for a name the model builds.
"""

import re
from typing import Optional

# ---- the training loop ------------------------------------------------------------------------------
LOSS_TOTAL = "loss/total"
LOSS_MAIN = "loss/main"
LOSS_AUX = "loss/aux"
PERPLEXITY = "perplexity"
LR = "lr"
GRAD_NORM = "grad_norm"
TOKENS_PER_SEC = "throughput/tokens_per_sec"
MFU = "throughput/mfu"
TOKENS_SEEN = "tokens_seen"
TRAIN_SECONDS = "time/train_seconds"
EPOCH = "epoch"
VAL_LOSS = "val/loss"
VAL_PERPLEXITY = "val/perplexity"
TASK_ACC = "eval/{task}/acc"

# ---- MoC layers (per layer l, expert i) ------------------------------------------------------------
EXPERT_UTIL = "experts/util_layer{layer}/e{expert}"
DROP_RATE = "experts/drop_rate_layer{layer}"
ROUTER_ENTROPY = "experts/router_entropy_layer{layer}"
MAX_LOAD_RATIO = "experts/max_load_ratio_layer{layer}"
MOC_LAYER_METRICS = (DROP_RATE, ROUTER_ENTROPY, MAX_LOAD_RATIO)   # one value per MoC layer
BIAS_SPREAD = "moc/bias_spread"
ROUTER_TEMPERATURE = "moc/router_temperature"   # with router_temperature_end: the annealed temperature
COLLAB_GATE = "moc/collab_gate"                 # with collab_gate: mean |gate| of the collaboration, 0 at the start

# ---- IRL (per reasoning step t) --------------------------------------------------------------------
IRL_UPDATE_NORM = "irl/update_norm_step{step}"
IRL_UPDATE_COSINE = "irl/step{step}_update_cosine"
IRL_GRAD_NORM = "irl/step{step}_grad_norm"
IRL_STEPS_TAKEN = "irl/steps_taken"     # with irl_halting: mean reasoning steps a token took, averaged over IRL layers
IRL_PONDER = "irl/ponder_cost"          # with irl_halting: mean ACT ponder cost (steps taken + remainder)

_PATTERNS: dict = {}


def _pattern(template: str) -> "re.Pattern":
    if template not in _PATTERNS:
        parts = re.split(r"\{(\w+)\}", template)   # literal, field, literal, field, ...
        regex = "".join(re.escape(p) if i % 2 == 0 else rf"(?P<{p}>\d+)" for i, p in enumerate(parts))
        _PATTERNS[template] = re.compile(f"^{regex}$")
    return _PATTERNS[template]


def match(template: str, name: str) -> Optional[dict]:
    """The numbers a templated name carries, e.g. match(EXPERT_UTIL, "experts/util_layer3/e1") == {"layer": 3,
    "expert": 1}; None when `name` is not of that template."""
    found = _pattern(template).match(name)
    return {key: int(value) for key, value in found.groupdict().items()} if found else None


def template_of(name: str, templates=(EXPERT_UTIL, DROP_RATE, ROUTER_ENTROPY, MAX_LOAD_RATIO, IRL_UPDATE_NORM,
                                       IRL_UPDATE_COSINE, IRL_GRAD_NORM)) -> Optional[str]:
    """The template among `templates` that `name` was built from, or None."""
    return next((template for template in templates if match(template, name) is not None), None)
