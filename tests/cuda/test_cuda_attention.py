"""Document masking and sliding windows on one GPU: FlexAttention (what attention_backend: auto picks on CUDA)
computes the dense mask's attention and gradients, eager and inside a compiled model, in fp32 and bf16."""

import pytest
import torch

from lunaris.model.masking import FLEX_ATTENTION, choose_backend

pytestmark = [pytest.mark.cuda,
              pytest.mark.skipif(not torch.cuda.is_available(),
                                 reason="needs a CUDA GPU: torch.cuda.is_available() is False")]
SEP = 0
needs_flex = pytest.mark.skipif(not FLEX_ATTENTION, reason=f"torch {torch.__version__} has no usable FlexAttention")


def packed_rows(B: int = 2, T: int = 300, seed: int = 3) -> torch.Tensor:
    """(B, T) ids on the GPU, documents of varied lengths (one ending on a tile edge, two separators in a row)."""
    gen = torch.Generator().manual_seed(seed)
    idx = torch.randint(1, 128, (B, T), generator=gen)
    idx[0, [5, 127, 128, 200]] = SEP
    idx[1, [60, 255]] = SEP
    return idx.cuda()


def loss_and_grads(h, backend: str, dtype, compiled: bool = False, **keys):
    """Loss and flattened gradients of one forward + backward of the same tiny model under `backend`."""
    model = h.make_model(attention_mask="document", document_separator_id=SEP, max_seq_len=300,
                       attention_backend=backend, **keys)
    idx = packed_rows()
    forward = torch.compile(model) if compiled else model
    with torch.autocast("cuda", dtype=dtype, enabled=dtype != torch.float32):
        loss = forward(idx, targets=idx).loss
    loss.backward()
    return loss.detach().float(), torch.cat([p.grad.flatten().float() for p in model.parameters()])


def test_auto_takes_flex_on_cuda_where_torch_has_it():
    assert choose_backend("auto", torch.device("cuda"), dropout=False) == ("flex" if FLEX_ATTENTION else "mask")


@needs_flex
@pytest.mark.parametrize("keys", [dict(), dict(attention_window=40, attention_window_pattern="SL")],
                         ids=["documents", "documents-window"])
@pytest.mark.parametrize("compiled", [False, True], ids=["eager", "compiled"])
def test_flex_trains_like_the_dense_mask(keys, compiled, cuda_helpers):
    want_loss, want_grads = loss_and_grads(cuda_helpers, "mask", torch.float32, **keys)
    loss, grads = loss_and_grads(cuda_helpers, "flex", torch.float32, compiled, **keys)
    torch.testing.assert_close(loss, want_loss, rtol=0, atol=1e-5)
    assert cuda_helpers.relative_error(grads, want_grads) < 1e-4
    varlen_loss, varlen_grads = loss_and_grads(cuda_helpers, "varlen", torch.float32, **keys)
    torch.testing.assert_close(varlen_loss, want_loss, rtol=0, atol=1e-5)
    assert cuda_helpers.relative_error(varlen_grads, want_grads) < 1e-4


@needs_flex
def test_flex_in_bf16_tracks_fp32(cuda_helpers):
    if not torch.cuda.is_bf16_supported():
        pytest.skip(f"{torch.cuda.get_device_name()} does not support bfloat16")
    want_loss, want_grads = loss_and_grads(cuda_helpers, "mask", torch.float32, attention_window=40)
    loss, grads = loss_and_grads(cuda_helpers, "flex", torch.bfloat16, True, attention_window=40)
    assert abs(float(loss - want_loss)) < 2e-2 * float(want_loss)
    assert cuda_helpers.relative_error(grads, want_grads) < 5e-2
