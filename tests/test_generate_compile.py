"""The compiled decode step: captured once as one graph, equal to eager decoding, and eager if compilation fails.

Graph capture and the compiled-path arithmetic are checked with backends that compile in seconds on CPU
(`aot_eager` runs the functionalized graph and takes the multiply-and-sum products of `decode_linear`).
The real inductor compilation takes half a minute or more on a small CPU: it runs when LUNARIS_TEST_INDUCTOR=1.
"""

import os

import pytest
import test_generate
import torch
from conftest import tiny_model_config

from lunaris import ConfigError, LunarisCodex
from lunaris.model.attention import decode_linear
from lunaris.model.generation import AUTO_COMPILE_STEPS, static_cache_length


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    """Each test compiles from scratch (no graph left by another test, no recompilation limit reached)."""
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def random_model(**overrides) -> LunarisCodex:
    return LunarisCodex(tiny_model_config(**overrides)).eval()


def generate_recording_logits(model, prompts, max_new_tokens, monkeypatch, **kwargs):
    """model.generate and the logits each new token was chosen from, stacked: (steps, B, vocab)."""
    out, recorded = test_generate.generate_recording_logits(model, prompts, max_new_tokens, monkeypatch, **kwargs)
    return out, torch.stack(recorded)


# (model, dynamo backend): `aot_eager` also functionalizes the graph (the in-place cache writes); `eager` runs
# the captured graph as it is, faster to set up. Both trace the compiled-path products of decode_linear.
VARIANTS = {"dense-gqa": (dict(n_heads=4, n_kv_heads=2), "aot_eager"),
            "dense-mha-irl2": (dict(n_kv_heads=None, n_reasoning_steps=2), "eager"),
            "moc": (dict(n_experts=4, top_k=2, capacity_factor=1.0), "eager")}


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_compiled_decoding_equals_eager_for_padded_batches(variant, monkeypatch):
    overrides, backend = VARIANTS[variant]
    model = random_model(**overrides)
    prompts = [[7, 3, 9, 1, 4, 4], [2], [5, 8, 8]]
    eager, eager_logits = generate_recording_logits(model, prompts, 12, monkeypatch, temperature=0, compile=False)
    stats = {}
    compiled, compiled_logits = generate_recording_logits(
        model, prompts, 12, monkeypatch, temperature=0, compile={"backend": backend, "fullgraph": True},
        stats=stats)
    assert stats["compiled"] and stats["compile_s"] > 0
    assert all(torch.equal(a, b) for a, b in zip(compiled, eager))
    torch.testing.assert_close(compiled_logits, eager_logits, rtol=0, atol=1e-4)


def test_the_decode_step_is_captured_once_for_a_whole_generation_and_for_nearby_lengths():
    from torch._dynamo.testing import CompileCounter
    counter = CompileCounter()
    model = random_model()
    model.generate(torch.randint(0, 128, (1, 5)), 20, temperature=0, compile={"backend": counter})
    assert counter.frame_count == 1            # one graph (no graph break), compiled once for all 19 steps
    model.generate(torch.randint(0, 128, (1, 9)), 30, temperature=0, compile={"backend": counter})
    assert counter.frame_count == 1            # another prompt and length, same cache bucket: no recompilation
    model.generate([[1, 2, 3], [4]], 10, temperature=0, compile={"backend": counter})
    assert counter.frame_count == 2            # a new batch size (and padding) is a new graph


def test_compiled_matrix_vector_products_equal_linear():
    """decode_linear under compilation (the weight-streaming multiply-and-sum) against F.linear."""
    weight = torch.randn(40, 24)
    fn = torch.compile(decode_linear, backend="aot_eager", fullgraph=True)
    for shape in [(1, 1, 24), (3, 1, 24), (2, 5, 24)]:  # 1 row, a few rows, more rows than MATVEC_MAX_ROWS
        x = torch.randn(shape)
        torch.testing.assert_close(fn(x, weight), torch.nn.functional.linear(x, weight), rtol=1e-5, atol=1e-5)


def test_a_failing_compilation_falls_back_to_eager_with_a_warning():
    def broken_backend(graph, example_inputs):
        raise RuntimeError("no compiler here")

    model = random_model()
    idx = torch.randint(0, 128, (2, 4))
    stats = {}
    with pytest.warns(UserWarning, match="torch.compile of the decode step failed.*no compiler here"):
        out = model.generate(idx, 8, temperature=0, compile={"backend": broken_backend}, stats=stats)
    assert not stats["compiled"]
    assert torch.equal(out, model.generate(idx, 8, temperature=0, compile=False))


def test_compile_defaults_and_choices():
    model = random_model()
    assert model.decode_compile_options(None, 10_000) is None          # auto: never on CPU
    assert model.decode_compile_options(False, 10) is None
    assert model.decode_compile_options(True, 10) == {}                # inductor, default mode on CPU
    assert model.decode_compile_options({"backend": "eager"}, 10) == {"backend": "eager"}
    with pytest.raises(ConfigError, match="compile must be"):
        model.decode_compile_options("yes", 10)


def test_auto_compilation_on_cuda_waits_until_eager_decoding_would_have_paid_for_it(monkeypatch):
    model = random_model()
    monkeypatch.setattr(LunarisCodex, "_decode_device_type", lambda self: "cuda")
    assert model.decode_compile_options(None, AUTO_COMPILE_STEPS // 2) is None
    assert model.decode_compile_options(None, AUTO_COMPILE_STEPS // 4) is None
    assert model.decode_compile_options(None, AUTO_COMPILE_STEPS // 4) == {"mode": "reduce-overhead"}
    assert model.decode_compile_options(None, 1) == {"mode": "reduce-overhead"}  # compiled once: stays compiled


def test_static_cache_lengths_are_a_few_powers_of_two_within_the_context():
    assert [static_cache_length(n, 1024) for n in (1, 40, 64, 65, 160, 600, 1024)] == [64, 64, 64, 128, 256, 1024,
                                                                                         1024]
    assert static_cache_length(100, 100) == 100 and static_cache_length(20, 48) == 48


@pytest.mark.skipif(os.environ.get("LUNARIS_TEST_INDUCTOR") != "1",
                    reason="inductor compiles C++ for tens of seconds; set LUNARIS_TEST_INDUCTOR=1 to run")
def test_inductor_compiled_decoding_equals_eager(monkeypatch):
    model = random_model(n_layers=1)
    prompts = [[7, 3, 9, 1, 4, 4], [2, 6]]
    eager, eager_logits = generate_recording_logits(model, prompts, 10, monkeypatch, temperature=0, compile=False)
    compiled, compiled_logits = generate_recording_logits(model, prompts, 10, monkeypatch, temperature=0,
                                                          compile=True)
    assert all(torch.equal(a, b) for a, b in zip(compiled, eager))
    torch.testing.assert_close(compiled_logits, eager_logits, rtol=0, atol=1e-4)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU: torch.cuda.is_available() is False")
def test_cuda_graph_decoding_equals_eager_and_reuses_its_cache(monkeypatch):
    precision = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("highest")  # no TF32: eager and compiled both in full fp32
    try:
        model = random_model(n_heads=4, n_kv_heads=2).cuda()
        prompts = [[7, 3, 9, 1, 4, 4], [2], [5, 8, 8]]
        eager, eager_logits = generate_recording_logits(model, prompts, 12, monkeypatch, temperature=0,
                                                        compile=False)
        for _ in range(2):  # the second generation replays the CUDA graph on the same (static) cache buffers
            stats = {}
            compiled, compiled_logits = generate_recording_logits(model, prompts, 12, monkeypatch, temperature=0,
                                                                  compile=True, stats=stats)
            assert stats["compiled"]
            assert all(torch.equal(a, b) for a, b in zip(compiled, eager))
            torch.testing.assert_close(compiled_logits, eager_logits, rtol=0, atol=1e-4)
        assert len(model._static_kv_caches) == 1
    finally:
        torch.set_float32_matmul_precision(precision)
