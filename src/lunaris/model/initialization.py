"""Weight initialization: one function, the only place a weight of the model is drawn.

`initialize(module, config)` draws every parameter of `module` exactly once, in `named_parameters` order (the
order the layers are built in: the embedding, then block by block the attention norm, attention q/k/v and output
(and q/k norms), the FFN norm and the FFN: dense SwiGLU gate|up and down, or MoC router, stacked experts gate|up
and down, collaboration, shared experts; the final norm; an untied LM head), by DESIGN.md's rules:

- Normal(0, 0.02) for every weight of two dimensions or more (linear, embedding, stacked expert weights);
- residual output projections, the parameters a module lists in its `residual_out` (attention output, FFN and
  expert down, collaboration output), Normal(0, 0.02/sqrt(2·n_layers)); with `zero_init_out` exact zeros, drawn
  with std 0 so that every other weight gets the same numbers as without it;
- norms weight 1, bias 0; other biases and vectors 0 (the residual scalars' x0 weights);
- a parameter a module lists in its `init_constants` ({name: value}), that constant (the IRL halting unit's bias,
  the residual scalars' residual weights).

Buffers are not drawn: the rotary tables are computed (RotaryEmbedding rebuilds them whenever the model moves),
every other buffer is state that starts at 0 (MoC's routing bias and its load counts) or at the constant its
module names in `init_constants` (an annealed router temperature starts at its end value).

LunarisCodex builds its layers on the meta device, where nothing is drawn, then calls this once on the whole model;
a layer built alone (tests, benchmarks) calls it on itself, with the same rules.
"""

import math

import torch
import torch.nn as nn

from lunaris.model.layers import RMSNorm, RotaryEmbedding

STD = 0.02


@torch.no_grad()
def initialize(module: nn.Module, config) -> nn.Module:
    """Draw every weight of `module` (a LunarisCodex or any of its layers) once; `config` a LunarisCodexConfig."""
    residual_std = 0.0 if config.zero_init_out else STD / math.sqrt(2 * config.n_layers)
    drawn = set()   # a tied LM head is the embedding: drawn once, as the embedding
    for sub in module.modules():   # the order of named_parameters
        for name, param in sub.named_parameters(recurse=False):
            if id(param) in drawn:
                continue
            drawn.add(id(param))
            if isinstance(sub, RMSNorm) and name == "weight":
                nn.init.ones_(param)
            elif name in getattr(sub, "init_constants", {}):   # IRL halting bias, residual scalars
                nn.init.constant_(param, sub.init_constants[name])
            elif param.dim() < 2:   # norm and other biases
                nn.init.zeros_(param)
            else:
                nn.init.normal_(param, 0.0, residual_std if name in getattr(sub, "residual_out", ()) else STD)
        if not isinstance(sub, RotaryEmbedding):
            constants = getattr(sub, "init_constants", {})
            for name, buffer in sub.named_buffers(recurse=False):
                buffer.fill_(constants[name]) if name in constants else buffer.zero_()
    return module
