"""Training steps on one GPU: mixed precision against fp32, the fp16 GradScaler, fused AdamW, torch.compile,
and the memory gradient checkpointing saves. Each builds two copies of one tiny model and compares them."""

import copy
import math

import pytest
import torch

from lunaris.train.step import train_step

pytestmark = [pytest.mark.cuda,
              pytest.mark.skipif(not torch.cuda.is_available(),
                                 reason="needs a CUDA GPU: torch.cuda.is_available() is False")]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_mixed_precision_steps_track_fp32(dtype, cuda_helpers):
    h = cuda_helpers
    if dtype == torch.bfloat16 and not torch.cuda.is_bf16_supported():
        pytest.skip(f"{torch.cuda.get_device_name()} does not support bfloat16")
    reference = h.make_model()
    mixed = copy.deepcopy(reference)
    reference_optimizer, mixed_optimizer = h.optimizer_for(reference), h.optimizer_for(mixed)
    # fp16 trains with a GradScaler, as the trainer does; a moderate initial scale never overflows this model
    scaler = torch.amp.GradScaler("cuda", init_scale=2.0 ** 10) if dtype == torch.float16 else None
    for step, batch in enumerate(h.batches(5)):
        want = train_step(reference, reference_optimizer, [batch], torch.float32, grad_clip=1.0)
        got = train_step(mixed, mixed_optimizer, [batch], dtype, grad_clip=1.0, scaler=scaler)
        assert math.isfinite(got["loss/total"]) and math.isfinite(got["grad_norm"])
        assert math.isclose(got["loss/total"], want["loss/total"], rel_tol=2e-2), (step, got, want)
        if step == 0:  # same weights: the gradient differs by rounding only
            assert math.isclose(got["grad_norm"], want["grad_norm"], rel_tol=5e-2), (got, want)
    if scaler is not None:
        assert scaler.get_scale() == 2.0 ** 10, "the scaler skipped a step: fp16 overflowed"


def test_grad_scaler_skips_a_step_with_inf_gradients(cuda_helpers):
    h = cuda_helpers
    model = h.make_model()
    optimizer = h.optimizer_for(model)
    scaler = torch.amp.GradScaler("cuda", init_scale=2.0 ** 10)
    first, second = h.batches(2)
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    # the final norm's weight is used once (unlike the tied embedding): make its gradient inf
    hook = model.norm.weight.register_hook(lambda grad: torch.full_like(grad, float("inf")))
    try:
        skipped = train_step(model, optimizer, [first], torch.float16, grad_clip=1.0, scaler=scaler)
    finally:
        hook.remove()
    assert not math.isfinite(skipped["grad_norm"])
    for name, p in model.named_parameters():
        assert torch.equal(p, before[name]), f"{name} changed in a step with inf gradients"
    assert scaler.get_scale() == 2.0 ** 9                      # halved after the inf step
    assert all(float(state.get("step", 0)) == 0 for state in optimizer.state.values())

    applied = train_step(model, optimizer, [second], torch.float16, grad_clip=1.0, scaler=scaler)
    assert math.isfinite(applied["loss/total"]) and math.isfinite(applied["grad_norm"])
    assert not torch.equal(model.norm.weight, before["norm.weight"])
    assert scaler.get_scale() == 2.0 ** 9                      # grows only after growth_interval good steps


def test_fused_adamw_equals_unfused(cuda_helpers):
    h = cuda_helpers
    fused_model = h.make_model("moc")
    plain_model = copy.deepcopy(fused_model)
    fused = h.optimizer_for(fused_model)
    assert fused.defaults.get("fused") is True, "configure_optimizers should use fused AdamW on CUDA"
    # the same groups (decay / no_decay / router, with their weight decay and lr), single-tensor AdamW
    plain_params = dict(plain_model.named_parameters())
    names = {id(p): n for n, p in fused_model.named_parameters()}
    groups = [{"params": [plain_params[names[id(p)]] for p in g["params"]], "lr": g["lr"],
               "weight_decay": g["weight_decay"]} for g in fused.param_groups]
    plain = torch.optim.AdamW(groups, lr=fused.defaults["lr"], betas=fused.defaults["betas"],
                              eps=fused.defaults["eps"], foreach=False, fused=False)
    gen = torch.Generator(device="cuda").manual_seed(0)
    for _ in range(5):  # identical gradients into both
        for name, p in fused_model.named_parameters():
            grad = torch.randn(p.shape, device="cuda", generator=gen) * 1e-2
            p.grad, plain_params[name].grad = grad.clone(), grad.clone()
        fused.step()
        plain.step()
    for name, p in fused_model.named_parameters():
        torch.testing.assert_close(p, plain_params[name], rtol=1e-5, atol=1e-6, msg=name)
        torch.testing.assert_close(fused.state[p]["exp_avg_sq"], plain.state[plain_params[name]]["exp_avg_sq"],
                                   rtol=1e-5, atol=1e-12, msg=name)


@pytest.mark.parametrize("arch, dtype", [("dense", torch.float32), ("moc", torch.bfloat16)],
                         ids=["dense-fp32", "moc-bf16"])
def test_compiled_step_equals_eager(arch, dtype, cuda_helpers):
    h = cuda_helpers
    torch._dynamo.reset()
    eager = h.make_model(arch)
    compiled_model = copy.deepcopy(eager)
    eager_optimizer, compiled_optimizer = h.optimizer_for(eager), h.optimizer_for(compiled_model)
    compiled = torch.compile(compiled_model)
    tolerance = 1e-4 if dtype == torch.float32 else 2e-2
    for step, batch in enumerate(h.batches(3)):
        want = train_step(eager, eager_optimizer, [batch], dtype, grad_clip=1.0)
        got = train_step(compiled, compiled_optimizer, [batch], dtype, grad_clip=1.0)
        for key in ("loss/total", "grad_norm"):
            assert math.isclose(got[key], want[key], rel_tol=tolerance), (step, key, got[key], want[key])
    if dtype == torch.float32:
        for (name, p), q in zip(eager.named_parameters(), compiled_model.parameters()):
            torch.testing.assert_close(q, p, rtol=1e-4, atol=1e-5, msg=name)


def test_gradient_checkpointing_lowers_peak_memory(cuda_helpers):
    """Peak memory of one bf16 step above what is allocated before it (weights, AdamW state)."""
    h = cuda_helpers
    shape = dict(vocab_size=h.model_config().vocab_size, d_model=256, n_layers=8, n_heads=8, n_kv_heads=8,
                 max_seq_len=512)
    (batch,) = h.batches(1, batch=8, seq_len=512)

    def step_peak(checkpointing: bool):
        model = h.make_model(**shape, use_gradient_checkpointing=checkpointing)
        optimizer = h.optimizer_for(model)
        train_step(model, optimizer, [batch], torch.bfloat16, grad_clip=1.0)   # AdamW state, kernels, workspace
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        loss = train_step(model, optimizer, [batch], torch.bfloat16, grad_clip=1.0)["loss/total"]
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated() - base
        del model, optimizer
        torch.cuda.empty_cache()
        return loss, peak

    plain_loss, plain_peak = step_peak(False)
    checkpointed_loss, checkpointed_peak = step_peak(True)
    assert math.isclose(checkpointed_loss, plain_loss, rel_tol=1e-2)   # same seed, same weights, same math
    assert checkpointed_peak < 0.8 * plain_peak, (
        f"gradient checkpointing peak {checkpointed_peak / 2**20:.1f} MiB, without {plain_peak / 2**20:.1f} MiB")
