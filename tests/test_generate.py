"""Generation: KV-cache decoding equals full recomputation, sampling filters, stopping rules, streaming text."""

import pytest
import torch
from conftest import byte_level_tokenizer, tiny_model_config

import lunaris.model.generation as model_module
from lunaris import LunarisCodex, LunarisError
from lunaris.generate import StreamingDecoder
from lunaris.model.attention import KVCache
from lunaris.model.sampling import filter_logits, sample_next_token

# ---- KV cache against full recomputation ---------------------------------------------------------------

MODEL_VARIANTS = {
    "dense-mha": dict(n_kv_heads=None),
    "dense-gqa": dict(n_heads=4, n_kv_heads=2),
    "dense-mqa-irl3": dict(n_heads=4, n_kv_heads=1, n_reasoning_steps=3),
    "moc-mha-collab": dict(n_experts=4, top_k=2, capacity_factor=1.0),
    "moc-simple-collab-irl2": dict(n_experts=4, top_k=2, capacity_factor=0.5, collab_mode="simple",
                                   n_reasoning_steps=2, moc_every=2),
}


def random_model(**overrides) -> LunarisCodex:
    """A tiny random model in eval mode (tied embeddings keep its top-2 logit gaps far above fp32 noise)."""
    return LunarisCodex(tiny_model_config(**overrides)).eval()


def generate_recording_logits(model, idx, max_new_tokens, monkeypatch, **kwargs):
    """model.generate, plus the (B, vocab) logits it sampled each new token from."""
    recorded = []
    real = model_module.sample_next_token

    def spy(logits, *args, **kw):
        recorded.append(logits.clone())
        return real(logits, *args, **kw)

    monkeypatch.setattr(model_module, "sample_next_token", spy)
    out = model.generate(idx, max_new_tokens, **kwargs)
    monkeypatch.undo()
    return out, recorded


@pytest.mark.parametrize("variant", list(MODEL_VARIANTS))
def test_cached_greedy_decoding_equals_full_recompute(variant, monkeypatch):
    model = random_model(**MODEL_VARIANTS[variant])
    idx = torch.randint(0, 128, (2, 7))
    out, step_logits = generate_recording_logits(model, idx, 30, monkeypatch, temperature=0)
    assert out.shape == (2, 37) and len(step_logits) == 30

    sequence = idx  # reference: no cache, the whole sequence through the model at every step
    for step in range(30):
        full_logits = model(sequence).logits[:, -1]                          # (B, vocab)
        torch.testing.assert_close(step_logits[step], full_logits, rtol=0, atol=1e-5)
        sequence = torch.cat([sequence, full_logits.argmax(-1, keepdim=True)], dim=1)
    assert torch.equal(out, sequence)


def test_cache_is_allocated_at_kv_heads():
    model = LunarisCodex(tiny_model_config(n_heads=4, n_kv_heads=1))
    caches = model.new_kv_caches(batch=3, length=20)
    assert len(caches) == model.config.n_layers
    assert caches[0].k.shape == (3, 1, 20, model.config.head_dim)


def test_last_logits_only_is_the_last_row_of_the_full_logits():
    model = LunarisCodex(tiny_model_config()).eval()
    idx = torch.randint(0, 128, (2, 9))
    last = model(idx, last_logits_only=True).logits
    assert last.shape == (2, 1, 128)
    torch.testing.assert_close(last, model(idx).logits[:, -1:], rtol=0, atol=1e-6)


def test_a_batch_of_prompts_decodes_like_each_prompt_alone():
    model = random_model()
    idx = torch.randint(0, 128, (3, 6))
    batched = model.generate(idx, 12, temperature=0)
    for row in range(3):
        assert torch.equal(batched[row:row + 1], model.generate(idx[row:row + 1], 12, temperature=0))


# ---- static-shape decoding: the step torch.compile captures -------------------------------------------

def test_kv_cache_write_puts_keys_at_a_tensor_position_in_place():
    cache = KVCache(batch=2, n_kv_heads=1, max_len=6, head_dim=3, device="cpu", dtype=torch.float32)
    k, v = torch.randn(2, 1, 1, 3), torch.randn(2, 1, 1, 3)
    keys, values = cache.write(k, v, torch.tensor([4]))
    assert keys.shape == (2, 1, 6, 3) and keys.data_ptr() == cache.k.data_ptr()   # the buffer itself
    assert torch.equal(cache.k[:, :, 4:5], k) and torch.equal(cache.v[:, :, 4:5], v)
    assert not cache.k[:, :, :4].any() and not cache.k[:, :, 5:].any()
    keys, _ = cache.write(k, v, torch.tensor([1]), length=2)
    assert keys.shape == (2, 1, 2, 3) and torch.equal(keys[:, :, 1:], k)


@pytest.mark.parametrize("variant", ["dense-gqa", "dense-mqa-irl3", "moc-mha-collab"])
def test_static_decode_step_over_the_whole_cache_equals_full_recompute(variant):
    """decode_step with static shapes (length=None: the whole preallocated cache, unwritten positions masked)."""
    model = random_model(**MODEL_VARIANTS[variant])
    idx = torch.randint(0, 128, (2, 5))
    caches = model.new_kv_caches(2, 64)  # longer than needed: the extra positions must stay invisible
    logits = model(idx, caches=caches, last_logits_only=True).logits[:, -1]
    sequence, slot = idx, torch.tensor([5])
    for _ in range(12):
        torch.testing.assert_close(logits, model(sequence).logits[:, -1], rtol=0, atol=1e-5)
        token = logits.argmax(-1, keepdim=True)
        sequence = torch.cat([sequence, token], dim=1)
        logits = model.decode_step(token, slot, caches)
        slot += 1


def test_eager_decode_step_is_bitwise_the_cached_forward():
    """The eager decode step computes exactly what forward with a cache computes (the reference stays exact)."""
    model = random_model(n_heads=4, n_kv_heads=2, n_reasoning_steps=2)
    idx = torch.randint(0, 128, (2, 6))
    caches_a, caches_b = model.new_kv_caches(2, 10), model.new_kv_caches(2, 10)
    model(idx, caches=caches_a)
    model(idx, caches=caches_b)
    token = torch.randint(0, 128, (2, 1))
    step = model.decode_step(token, torch.tensor([6]), caches_a, length=7)
    forward = model(token, caches=caches_b, start=6, last_logits_only=True).logits[:, -1]
    assert torch.equal(step, forward)


# ---- prompts of different lengths in one batch ---------------------------------------------------------

@pytest.mark.parametrize("variant", list(MODEL_VARIANTS))
def test_prompts_of_different_lengths_decode_in_one_batch_like_each_alone(variant):
    model = random_model(**MODEL_VARIANTS[variant])
    gen = torch.Generator().manual_seed(1)
    prompts = [torch.randint(0, 128, (length,), generator=gen).tolist() for length in (4, 11, 1, 7)]
    batched = model.generate(prompts, 14, temperature=0)
    assert isinstance(batched, list) and len(batched) == 4
    for prompt, row in zip(prompts, batched):
        alone = model.generate(torch.tensor([prompt]), 14, temperature=0)[0]
        assert torch.equal(row, alone)  # token for token, the prompt included


def test_a_padded_batch_sees_the_logits_each_prompt_sees_alone(monkeypatch):
    model = random_model(n_heads=4, n_kv_heads=1)
    prompts = [[5, 9, 2, 7, 7, 1, 3], [8], [4, 4, 6]]
    _, batched = generate_recording_logits(model, prompts, 10, monkeypatch, temperature=0)
    for row, prompt in enumerate(prompts):
        _, alone = generate_recording_logits(model, torch.tensor([prompt]), 10, monkeypatch, temperature=0)
        torch.testing.assert_close(torch.stack([step[row] for step in batched]), torch.cat(alone), rtol=0, atol=1e-5)


def test_a_list_of_prompts_accepts_tensors_stops_each_row_at_eos_and_streams_every_row():
    model = random_model()
    prompts = [torch.tensor([3, 1, 4, 1, 5]), torch.tensor([9, 2])]
    free = model.generate(prompts, 12, temperature=0)
    eos = free[1][2 + 3].item()       # the 4th new token of row 1 becomes the end of text
    first = free[1][2:].tolist().index(eos)
    stopped = model.generate(prompts, 12, temperature=0, eos_token_id=eos)
    assert torch.equal(stopped[1], free[1][:2 + first + 1])     # ends with its eos, nothing after it
    new0 = free[0][5:].tolist()
    end0 = new0.index(eos) + 1 if eos in new0 else len(new0)
    assert torch.equal(stopped[0], free[0][:5 + end0])
    steps = list(model.generate_stream(prompts, 3, temperature=0))
    assert [tuple(step.shape) for step in steps] == [(2, 1)] * 3
    same_length = model.generate([[1, 2, 3], [4, 5, 6]], 5, temperature=0)
    assert torch.equal(torch.stack(same_length), model.generate(torch.tensor([[1, 2, 3], [4, 5, 6]]), 5, temperature=0))


@pytest.mark.parametrize("prompts,message", [([], "empty list of prompts"), ([[1, 2], []], "the prompt has 0 tokens"),
                                             ([[1] * 64], "the prompt has 64 tokens")])
def test_bad_lists_of_prompts_are_clear_errors(prompts, message):
    with pytest.raises(LunarisError, match=message):
        random_model().generate(prompts, 3)


# ---- stopping --------------------------------------------------------------------------------------------

def test_generation_stops_at_end_of_text_and_pads_finished_rows():
    model = random_model()
    idx = torch.randint(0, 128, (2, 5))
    free = model.generate(idx, 20, temperature=0)
    new0 = free[0, 5:].tolist()
    stop = max(i for i, token in enumerate(new0) if token not in new0[:i])  # the last first occurrence
    eos = new0[stop]

    single = model.generate(idx[:1], 20, temperature=0, eos_token_id=eos)
    assert single.shape[1] == 5 + stop + 1 and single[0, -1].item() == eos

    both = model.generate(idx, 20, temperature=0, eos_token_id=eos)
    row1 = free[1, 5:].tolist()
    row1_end = row1.index(eos) + 1 if eos in row1 else 20  # new tokens row 1 makes, its own eos included
    assert both.shape[1] == 5 + max(stop + 1, row1_end)   # stops once every row has finished
    assert torch.equal(both[0, :5 + stop], free[0, :5 + stop])
    assert (both[0, 5 + stop:] == eos).all()              # a finished row is padded with eos
    assert torch.equal(both[1, :5 + row1_end], free[1, :5 + row1_end])
    assert (both[1, 5 + row1_end:] == eos).all()


def test_generation_stops_at_the_context_limit_with_a_warning():
    model = LunarisCodex(tiny_model_config(max_seq_len=32))
    idx = torch.randint(0, 128, (1, 28))
    with pytest.warns(UserWarning, match="context limit, max_seq_len=32"):
        out = model.generate(idx, 10, temperature=0)
    assert out.shape == (1, 32)


@pytest.mark.parametrize("length", [32, 40])
def test_a_prompt_that_fills_the_context_is_a_clear_error(length):
    model = LunarisCodex(tiny_model_config(max_seq_len=32))
    with pytest.raises(LunarisError, match=f"the prompt has {length} tokens.*max_seq_len=32.*shorten the prompt"):
        model.generate(torch.zeros(1, length, dtype=torch.long), 5)


def test_generation_runs_in_eval_mode_and_restores_the_training_mode():
    model = random_model(dropout=0.5)
    idx = torch.randint(0, 128, (1, 5))
    expected = model.generate(idx, 10, temperature=0)  # eval mode: dropout off
    model.train()
    assert torch.equal(model.generate(idx, 10, temperature=0), expected)
    assert model.training


# ---- sampling --------------------------------------------------------------------------------------------

def reference_allowed(logits: torch.Tensor, top_k, top_p) -> torch.Tensor:
    """(B, V) bool: tokens within the top k and then within the smallest set holding top_p probability."""
    allowed = torch.zeros_like(logits, dtype=torch.bool)
    for row, values in enumerate(logits.tolist()):
        order = sorted(range(len(values)), key=lambda i: -values[i])
        kept = order[:top_k] if top_k else order
        if top_p is not None:
            weights = torch.tensor([values[i] for i in kept]).softmax(0).tolist()
            total, nucleus = 0.0, []
            for i, weight in zip(kept, weights):
                nucleus.append(i)
                total += weight
                if total >= top_p:
                    break
            kept = nucleus
        allowed[row, kept] = True
    return allowed


@pytest.mark.parametrize("top_k,top_p", [(5, None), (None, 0.6), (12, 0.8), (1, None), (None, 1e-6)])
def test_top_k_and_top_p_never_sample_an_excluded_token(top_k, top_p):
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(32, 40, generator=gen) * 2
    allowed = reference_allowed(logits, top_k, top_p)
    assert torch.equal(torch.isfinite(filter_logits(logits, top_k, top_p)), allowed)
    for _ in range(50):
        tokens = sample_next_token(logits, 1.0, top_k, top_p, generator=gen)  # (32, 1)
        assert allowed.gather(1, tokens).all()


def test_sampling_covers_the_allowed_tokens_and_temperature_zero_is_argmax():
    logits = torch.zeros(1, 10)
    logits[0, :4] = 5.0  # four equally likely tokens, six unlikely ones
    gen = torch.Generator().manual_seed(0)
    draws = torch.cat([sample_next_token(logits, 1.0, top_k=4, generator=gen) for _ in range(200)])
    assert set(draws.flatten().tolist()) == {0, 1, 2, 3}
    spread = torch.randn(4, 30)
    assert torch.equal(sample_next_token(spread, 0.0), spread.argmax(-1, keepdim=True))


def test_seeded_sampling_is_reproducible_and_top_k_1_is_greedy():
    model = random_model()
    idx = torch.randint(0, 128, (2, 4))
    a = model.generate(idx, 15, temperature=0.9, top_p=0.95, generator=torch.Generator().manual_seed(3))
    b = model.generate(idx, 15, temperature=0.9, top_p=0.95, generator=torch.Generator().manual_seed(3))
    assert torch.equal(a, b)
    assert torch.equal(model.generate(idx, 15, temperature=1.0, top_k=1), model.generate(idx, 15, temperature=0))


@pytest.mark.parametrize("kwargs,message", [(dict(temperature=-1.0), "temperature"), (dict(top_k=0), "top_k"),
                                            (dict(top_p=1.5), "top_p"), (dict(top_p=0.0), "top_p")])
def test_invalid_sampling_settings_are_clear_errors(kwargs, message):
    model = LunarisCodex(tiny_model_config())
    with pytest.raises(LunarisError, match=message):
        model.generate(torch.zeros(1, 3, dtype=torch.long), 5, **kwargs)


# ---- streaming text ----------------------------------------------------------------------------------------


def test_streaming_decoder_releases_whole_characters_only():
    tokenizer = byte_level_tokenizer()
    text = "héllo wörld ☃ 日本語 fox"
    ids = tokenizer.encode(text).ids
    decoder = StreamingDecoder(tokenizer, prompt_ids=tokenizer.encode("the ").ids)
    pieces = [decoder.push(i) for i in ids]
    assert "" in pieces  # a multi-byte character split over tokens was held back
    assert all("\ufffd" not in piece for piece in pieces)
    assert "".join(pieces) + decoder.flush() == text
