"""MoC on the GPU: the grouped-matmul expert path (torch._grouped_mm) equals the padded batched-matmul path in bf16.

`MoCLayer.dispatch_backend` is "auto" (grouped where the probe says torch._grouped_mm works for the device and
compute dtype, and d_model and the expert hidden size are 16-byte aligned), or "grouped" / "padded" to force one.
"""

import pytest
import torch

from lunaris.model.moc import MoCLayer, grouped_mm_supported

pytestmark = [pytest.mark.cuda,
              pytest.mark.skipif(not torch.cuda.is_available(),
                                 reason="needs a CUDA GPU: torch.cuda.is_available() is False")]


@pytest.mark.parametrize("capacity_factor", [None, 1.0], ids=["dropless", "capacity-1.0"])
@pytest.mark.parametrize("collab_mode", ["none", "mha"])
def test_grouped_matmul_equals_padded_in_bf16(collab_mode, capacity_factor, cuda_helpers):
    h = cuda_helpers
    if not torch.cuda.is_bf16_supported():
        pytest.skip(f"{torch.cuda.get_device_name()} does not support bfloat16")
    x = torch.randn(4, 64, 64, device="cuda")                     # B, T, D: 256 tokens
    if not grouped_mm_supported(str(x.device), torch.bfloat16):
        pytest.skip(f"torch._grouped_mm (bf16) does not work on {torch.cuda.get_device_name()} with torch "
                    f"{torch.__version__}; the padded path is the only one here")
    torch.manual_seed(0)
    config = h.model_config("moc", collab_mode=collab_mode, capacity_factor=capacity_factor, n_reasoning_steps=2)
    layer = MoCLayer(config, 0).cuda()
    with torch.autocast("cuda", dtype=torch.bfloat16):
        assert layer.use_grouped(x), "auto should choose the grouped matmul for bf16 on this GPU"

    results = {}
    for backend in ("grouped", "padded"):
        layer.dispatch_backend = backend
        with torch.autocast("cuda", dtype=torch.bfloat16):
            y, aux, stats = layer(x)
        (y.float().square().sum() + aux).backward()
        results[backend] = (y.float(), aux.detach(), stats,
                            {name: p.grad.clone() for name, p in layer.named_parameters()})
        layer.zero_grad(set_to_none=True)
    (y1, aux1, stats1, grads1), (y2, aux2, stats2, grads2) = results["grouped"], results["padded"]
    assert y1.dtype == torch.float32 and torch.isfinite(y1).all()
    assert h.relative_error(y1, y2) < 1e-2
    torch.testing.assert_close(aux1, aux2)                         # the router runs in fp32 before dispatch
    assert stats1.keys() == stats2.keys()
    for key in stats1:
        if "irl/" not in key:                                      # routing statistics: identical
            torch.testing.assert_close(stats1[key], stats2[key], msg=key)
    for name in grads1:
        assert h.relative_error(grads1[name], grads2[name]) < 2e-2, name
