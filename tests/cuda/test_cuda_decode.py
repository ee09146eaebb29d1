"""Decoding on the GPU: logits from the KV cache (prefill, then one token at a time) equal a full recompute
of the whole sequence, and greedy `generate` picks the tokens a recompute-everything loop picks."""

import pytest
import torch

pytestmark = [pytest.mark.cuda,
              pytest.mark.skipif(not torch.cuda.is_available(),
                                 reason="needs a CUDA GPU: torch.cuda.is_available() is False")]


@pytest.mark.parametrize("arch", ["dense", "moc"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@torch.no_grad()
def test_kv_cache_logits_equal_full_recompute(arch, dtype, cuda_helpers):
    h = cuda_helpers
    if dtype == torch.bfloat16 and not torch.cuda.is_bf16_supported():
        pytest.skip(f"{torch.cuda.get_device_name()} does not support bfloat16")
    model = h.make_model(arch).eval()
    tokens = torch.randint(0, model.config.vocab_size, (2, 40), device="cuda")
    prompt = 9
    with torch.autocast("cuda", dtype=dtype, enabled=dtype != torch.float32):
        full = model(tokens).logits.float()                                    # (B, T, V)
        caches = model.new_kv_caches(tokens.shape[0], tokens.shape[1])
        cached = [model(tokens[:, :prompt], caches=caches).logits.float()]     # prefill: (B, prompt, V)
        for t in range(prompt, tokens.shape[1]):
            cached.append(model(tokens[:, t:t + 1], caches=caches, start=t).logits.float())
    cached = torch.cat(cached, dim=1)
    tolerance = dict(rtol=1e-4, atol=1e-4) if dtype == torch.float32 else dict(rtol=5e-2, atol=5e-2)
    torch.testing.assert_close(cached, full, **tolerance)


@pytest.mark.parametrize("arch", ["dense", "moc"])
@torch.no_grad()
def test_greedy_generate_equals_recompute_loop(arch, cuda_helpers):
    h = cuda_helpers
    model = h.make_model(arch).eval()
    prompt = torch.randint(0, model.config.vocab_size, (2, 7), device="cuda")
    generated = model.generate(prompt, max_new_tokens=20, temperature=0.0)
    sequence = prompt
    for _ in range(20):
        next_token = model(sequence).logits[:, -1].argmax(dim=-1, keepdim=True)   # no cache: everything again
        sequence = torch.cat([sequence, next_token], dim=1)
    assert torch.equal(generated, sequence)
