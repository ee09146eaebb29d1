"""`lunaris plan`'s estimate on the GPU it runs on: traced on fake CUDA tensors, compared with a real step's
torch.cuda.max_memory_allocated (the CPU's check is tests/test_plan.py)."""

import gc

import pytest
import torch

from lunaris import LunarisCodex, load_config
from lunaris.train import plan
from lunaris.train import step as steps
from lunaris.train.optim import build_optimizer

pytestmark = [pytest.mark.cuda,
              pytest.mark.skipif(not torch.cuda.is_available(),
                                 reason="needs a CUDA GPU: torch.cuda.is_available() is False")]

# 27M parameters, 8 x 512 tokens of an 8192-token vocabulary, bf16: activations of some hundreds of MiB
SHAPE = ["--model.d_model=512", "--model.n_layers=6", "--model.n_heads=8", "--model.n_kv_heads=4",
         "--model.ffn_hidden_size=1536", "--model.vocab_size=8192", "--model.max_seq_len=512", "--batch_size=8",
         "--dtype=bf16", "--device=cuda"]
CONFIGS = {
    "dense, AdamW": SHAPE + ["--optimizer=adamw"],
    "dense, Muon": SHAPE + ["--optimizer=muon"],
    "dense, gradient checkpointing": SHAPE + ["--model.use_gradient_checkpointing=true"],
    "MoC": SHAPE + ["--model.n_experts=8", "--model.top_k=2", "--model.ffn_hidden_size=512"],
}


def measured_step(config) -> dict:
    """Bytes allocated by the model and optimizer and at the peak of a step after the first (the optimizer state
    exists), and the activations: allocated when the backward pass starts minus before the forward pass."""
    gc.collect()
    torch.cuda.empty_cache()
    start = torch.cuda.memory_allocated()
    torch.manual_seed(0)
    model = LunarisCodex(config.model.sized()).cuda().train()
    optimizer = build_optimizer(model, config, "cuda")
    x = torch.randint(0, config.model.vocab_size, (config.batch_size, config.model.max_seq_len + 1), device="cuda")
    at_backward = []

    def forward(idx, targets):
        out = model(idx, targets)
        out.main_loss.register_hook(lambda grad: at_backward.append(torch.cuda.memory_allocated()))
        return out

    def step():
        steps.forward_backward(forward, x[:, :-1], x[:, 1:], 1.0, 1, torch.bfloat16)
        steps.clip_gradients(model.parameters(), optimizer, config.grad_clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    step()
    torch.cuda.synchronize()
    before_step = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    step()
    torch.cuda.synchronize()
    return {"total": torch.cuda.max_memory_allocated() - start, "activations": at_backward[-1] - before_step}


@pytest.mark.parametrize("name", list(CONFIGS))
def test_the_estimate_is_within_15_percent_of_max_memory_allocated(name):
    config = load_config("demo-cpu", CONFIGS[name])
    target = plan.local_target(config)
    assert target.on_gpu and target.trace_device.type == "cuda"
    memory = plan.estimator_for(config, target).rank(
        plan.Layout("single", 1, config.model.use_gradient_checkpointing), config.batch_size)
    measured = measured_step(config)
    print(f"\n{name}: estimated {memory.peak / 2**20:.1f} MiB (activations {memory.rows['activations'] / 2**20:.1f}), "
          f"measured {measured['total'] / 2**20:.1f} MiB (activations {measured['activations'] / 2**20:.1f})")
    assert memory.rows["activations"] == pytest.approx(measured["activations"], rel=0.15)
    assert memory.peak == pytest.approx(measured["total"], rel=0.15)
