"""Document masking and sliding windows (model/masking.py): every backend computes the reference attention, none
allocates T^2 per row, a token outside the window has no influence, decoding with a window equals the forward."""

import pytest
import torch
from conftest import tiny_model_config
from torch.utils._python_dispatch import TorchDispatchMode

from lunaris import ConfigError, LunarisCodex
from lunaris.model import masking
from lunaris.model.masking import FLEX_ATTENTION, FLEX_TILE, AttentionPlan, choose_backend, documents, sdpa

SEP = 0
needs_flex = pytest.mark.skipif(not FLEX_ATTENTION, reason=f"torch {torch.__version__} has no usable FlexAttention")


def packed_ids(B: int, T: int, vocab: int = 50, seed: int = 0) -> torch.Tensor:
    """(B, T) ids with separators: short and long documents, two separators in a row, one at the very start."""
    gen = torch.Generator().manual_seed(seed)
    idx = torch.randint(1, vocab, (B, T), generator=gen)
    idx[0, [0, 3, 4, T // 8, 2 * T // 3, T - 1]] = SEP
    if B > 1:
        idx[1, [T // 2, T // 2 + 1]] = SEP
    return idx


def reference_mask(idx: torch.Tensor, window=None) -> torch.Tensor:
    """(B, 1, T, T) bool written out pair by pair: j <= i, no separator in [j, i), i - j < window."""
    B, T = idx.shape
    mask = torch.zeros(B, 1, T, T, dtype=torch.bool)
    for b in range(B):
        for i in range(T):
            j = i
            while j >= 0 and (window is None or i - j < window) and (j == i or idx[b, j] != SEP):
                mask[b, 0, i, j] = True
                j -= 1
    return mask


def qkv(B: int, T: int, grad: bool = False):
    gen = torch.Generator().manual_seed(1)
    shapes = [(B, 4, T, 16), (B, 2, T, 16), (B, 2, T, 16)]                  # GQA: 4 query heads, 2 KV heads
    return [torch.randn(shape, generator=gen).requires_grad_(grad) for shape in shapes]


# ---- the backends ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("window", [None, 1, 7, 130], ids=lambda w: f"window-{w}")
@pytest.mark.parametrize("documented", [True, False], ids=["documents", "one-document"])
@pytest.mark.parametrize("backend", ["varlen", "mask"])
def test_varlen_and_mask_compute_the_reference_attention_and_its_gradients(backend, documented, window):
    T = 300                                                                 # three tiles, the last one partial
    idx = packed_ids(2, T)
    mask = reference_mask(idx if documented else torch.ones_like(idx), window)
    document = documents(idx, SEP)[0] if documented else None
    q, k, v = qkv(2, T, grad=True)
    reference = sdpa(q, k, v, mask)
    reference_grads = torch.autograd.grad(reference.square().sum(), (q, k, v))
    out = AttentionPlan(backend, idx, document).attend(q, k, v, window)
    torch.testing.assert_close(out, reference, rtol=0, atol=1e-5)
    for got, want in zip(torch.autograd.grad(out.square().sum(), (q, k, v)), reference_grads):
        torch.testing.assert_close(got, want, rtol=0, atol=1e-4)


@needs_flex
@pytest.mark.parametrize("documented, window", [(True, None), (True, 7), (False, 130), (True, 300)])
def test_flex_computes_the_reference_attention(documented, window):
    T = 300
    idx = packed_ids(2, T)
    mask = reference_mask(idx if documented else torch.ones_like(idx), window)
    document = documents(idx, SEP)[0] if documented else None
    q, k, v = qkv(2, T)
    with torch.no_grad():
        out = AttentionPlan("flex", idx, document).attend(q, k, v, window)
    torch.testing.assert_close(out, sdpa(q, k, v, mask), rtol=0, atol=1e-5)


@pytest.mark.parametrize("window", [None, 5, 127, 128, 129, 200], ids=lambda w: f"window-{w}")
def test_flex_tiles_skip_exactly_the_tiles_without_a_visible_pair(window):
    T = 3 * FLEX_TILE + 44
    idx = packed_ids(2, T)
    idx[1, FLEX_TILE:3 * FLEX_TILE:FLEX_TILE // 2] = SEP                    # documents ending on and off tile edges
    touched, full = masking.tile_masks(documents(idx, SEP)[0], T, window, "cpu")
    mask = reference_mask(idx, window)[:, 0]                               # (B, T, T)
    n = touched.shape[-1]
    for b in range(2):
        for qt in range(n):
            for kt in range(n):
                tile = mask[b, qt * FLEX_TILE:(qt + 1) * FLEX_TILE, kt * FLEX_TILE:(kt + 1) * FLEX_TILE]
                assert touched[b, qt, kt] == tile.any(), (b, qt, kt)
                assert full[b, qt, kt] == tile.all(), (b, qt, kt)


class LargestTensor(TorchDispatchMode):
    """The largest number of elements of any tensor an operation produces while the mode is on."""

    def __init__(self):
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for tensor in out if isinstance(out, (tuple, list)) else [out]:
            if isinstance(tensor, torch.Tensor):
                self.largest = max(self.largest, tensor.numel())
        return out


def largest_tensor_of_a_training_step(T: int, **keys) -> int:
    model = LunarisCodex(tiny_model_config(attention_mask="document", document_separator_id=SEP, max_seq_len=T,
                                           **keys))
    idx = packed_ids(2, T, vocab=128)
    with LargestTensor() as probe:
        model(idx, targets=idx).loss.backward()                             # forward and backward
    return probe.largest


@pytest.mark.parametrize("backend, window", [("varlen", None), ("varlen", 16), ("mask", None)])
def test_only_the_mask_backend_allocates_a_tensor_that_grows_with_t_squared(backend, window):
    small, large = (largest_tensor_of_a_training_step(T, attention_backend=backend, attention_window=window)
                    for T in (256, 512))
    if backend == "mask":
        assert large == 4 * small and large >= 2 * 512 * 512               # a (B, 1, T, T) mask, or the scores
    else:
        assert large <= 2 * small    # activations, logits: O(T), never a (T, T) mask or score matrix


# ---- which backend runs --------------------------------------------------------------------------------------

def test_auto_picks_varlen_on_the_cpu_flex_on_cuda_and_the_mask_under_compile_on_the_cpu(monkeypatch):
    assert choose_backend("auto", torch.device("cpu"), dropout=False) == "varlen"
    assert choose_backend("auto", torch.device("cuda"), dropout=False) == ("flex" if FLEX_ATTENTION else "mask")
    assert choose_backend("auto", torch.device("cuda"), dropout=True) == "mask"     # flex has no dropout
    assert choose_backend("auto", torch.device("mps"), dropout=False) == "mask"
    assert choose_backend("varlen", torch.device("cuda"), dropout=True) == "varlen"
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)
    assert choose_backend("auto", torch.device("cpu"), dropout=False) == "mask"


def test_flex_where_it_cannot_run_is_a_clear_error():
    with pytest.raises(ConfigError, match="flex has no attention dropout"):
        choose_backend("flex", torch.device("cuda"), dropout=True)
    if not FLEX_ATTENTION:
        with pytest.raises(ConfigError, match="torch 2.6 or later"):
            choose_backend("flex", torch.device("cpu"), dropout=False)
        return
    model = LunarisCodex(tiny_model_config(attention_mask="document", document_separator_id=SEP,
                                           attention_backend="flex"))
    with pytest.raises(ConfigError, match="flex cannot train on the CPU"):
        model(packed_ids(1, 32, vocab=128))


@needs_flex
def test_flex_inside_a_compiled_model_equals_the_eager_mask():
    """What CUDA training runs (the trainer compiles the whole model): the block mask built inside the graph."""
    idx = packed_ids(2, 160, vocab=128)
    models = []
    for backend in ("flex", "mask"):
        torch.manual_seed(0)
        models.append(LunarisCodex(tiny_model_config(attention_mask="document", document_separator_id=SEP,
                                                     max_seq_len=160, attention_window=50,
                                                     attention_window_pattern="SL", attention_backend=backend)))
    with torch.no_grad():
        compiled = torch.compile(models[0])(idx).logits
        torch.testing.assert_close(compiled, models[1](idx).logits, rtol=0, atol=1e-5)


def test_the_mask_and_varlen_backends_train_alike():
    idx = packed_ids(2, 64, vocab=128)
    losses, grads = [], []
    for backend in ("mask", "varlen"):
        torch.manual_seed(0)
        model = LunarisCodex(tiny_model_config(attention_mask="document", document_separator_id=SEP,
                                               attention_window=9, attention_backend=backend)).train()
        loss = model(idx, targets=idx).loss
        loss.backward()
        losses.append(loss.detach())
        grads.append(torch.cat([p.grad.flatten() for p in model.parameters()]))
    torch.testing.assert_close(losses[0], losses[1], rtol=0, atol=1e-6)
    torch.testing.assert_close(grads[0], grads[1], rtol=0, atol=1e-5)


# ---- sliding windows -----------------------------------------------------------------------------------------

def windowed_model(backend: str = "auto", **overrides) -> LunarisCodex:
    """A tiny eval-mode model whose outputs depend strongly on the context (large attention weights)."""
    torch.manual_seed(0)
    model = LunarisCodex(tiny_model_config(attention_backend=backend, **overrides)).eval()
    with torch.no_grad():
        for block in model.blocks:
            block.attn.qkv.weight.mul_(4.0)
    return model


@pytest.mark.parametrize("backend", ["varlen", "mask", pytest.param("flex", marks=needs_flex)])
def test_a_token_beyond_the_window_has_no_influence(backend):
    # two layers of window 4: position 3 reaches positions 3..6 after one layer, 3..9 after two
    model = windowed_model(backend, attention_window=4)
    idx = torch.randint(1, 128, (1, 24))
    changed = idx.clone()
    changed[0, 3] = (idx[0, 3] + 1) % 128
    with torch.no_grad():
        before, after = model(idx).logits[0], model(changed).logits[0]
    difference = (before - after).abs().amax(dim=-1)                        # (T,)
    assert (difference[10:] == 0).all(), difference
    assert difference[9] > 1e-4 and (difference[3:10] > 0).all()
    assert (difference[:3] == 0).all()
    full_last = windowed_model(backend, attention_window=4, attention_window_pattern="SL")
    with torch.no_grad():
        assert (full_last(idx).logits[0, 20] - full_last(changed).logits[0, 20]).abs().max() > 1e-4


def test_a_window_applies_within_each_document():
    model = windowed_model(attention_window=5, attention_mask="document", document_separator_id=SEP)
    docs = [torch.randint(1, 128, (n,)) for n in (9, 17, 6)]
    docs[0][-1] = docs[1][-1] = SEP
    row = torch.cat(docs)[None]
    with torch.no_grad():
        packed = model(row).logits[0]
        for doc, start in zip(docs, (0, 9, 26)):
            torch.testing.assert_close(packed[start:start + len(doc)], model(doc[None]).logits[0], rtol=0,
                                       atol=1e-5)


@pytest.mark.parametrize("pattern", [None, "SL"])
def test_decoding_with_a_window_equals_the_forward(pattern):
    model = windowed_model(attention_window=3, attention_window_pattern=pattern)
    idx = torch.randint(1, 128, (2, 5))
    for static in (True, False):
        caches = model.new_kv_caches(2, 32)
        with torch.no_grad():
            logits = model(idx, caches=caches, last_logits_only=True).logits[:, -1]     # the prefill: a band mask
            sequence, slot = idx, torch.tensor([5])
            for _ in range(10):                                             # well past the window
                torch.testing.assert_close(logits, model(sequence).logits[:, -1], rtol=0, atol=1e-5)
                token = logits.argmax(-1, keepdim=True)
                sequence = torch.cat([sequence, token], dim=1)
                logits = model.decode_step(token, slot, caches, length=None if static else int(slot) + 1)
                slot += 1


def test_padded_prompts_with_a_window_generate_what_each_prompt_generates_alone():
    model = windowed_model(attention_window=4, attention_window_pattern="SSL", n_layers=3)
    prompts = [torch.randint(1, 128, (n,)) for n in (3, 9, 6)]
    together = model.generate(prompts, 8, temperature=0)
    for prompt, row in zip(prompts, together):
        assert torch.equal(row, model.generate(prompt[None], 8, temperature=0)[0])
    compiled = model.generate(prompts, 8, temperature=0, compile={"backend": "eager"})
    assert all(torch.equal(a, b) for a, b in zip(compiled, together))


def test_window_config_layers_and_flops():
    config = tiny_model_config(n_layers=6, attention_window=16, attention_window_pattern="SSL")
    assert [config.layer_window(i) for i in range(6)] == [16, 16, None, 16, 16, None]
    assert config.windowed and not tiny_model_config().windowed
    assert not tiny_model_config(attention_window=16, attention_window_pattern="L").windowed
    model, plain = LunarisCodex(config), LunarisCodex(tiny_model_config(n_layers=6))
    c = config
    assert plain.flops_per_token(64) - model.flops_per_token(64) == 12 * c.n_heads * c.head_dim * 4 * (64 - 16)
    assert model.flops_per_token(8) == plain.flops_per_token(8)            # a window longer than the sequence
    assert [b.attn.window for b in model.blocks] == [16, 16, None, 16, 16, None]
    # with a pattern the last layer always sees the whole context; without one every layer has the window
    assert [tiny_model_config(n_layers=4, attention_window=8, attention_window_pattern=p).layer_window(i)
            for p in ("SSL", "S", None) for i in range(4)] == [8, 8, None, None] + [8, 8, 8, None] + [8] * 4


@pytest.mark.parametrize("keys, message", [
    (dict(attention_window_pattern="SXL", attention_window=8), "must be a string of S (sliding window) and L"),
    (dict(attention_window_pattern="SL"), "chooses the layers of attention_window, which is null"),
    (dict(attention_window=0), "model.attention_window must be a positive integer or null, got 0"),
    (dict(attention_backend="flax"), "must be one of auto, flex, varlen, mask, got 'flax' (did you mean 'flex'?)"),
])
def test_window_and_backend_values_are_checked(keys, message):
    problems = tiny_model_config(**keys).problems()
    assert len(problems) == 1 and message in problems[0], problems
