"""MoC under DDP and FSDP2: two gloo processes on CPU, an expert that receives no tokens.

DDP runs with find_unused_parameters=False: the idle expert's slice of the stacked weights must
still get a (zero) gradient, and collaboration modules of unused modes must not exist, or DDP
raises (or hangs) at the second step. FSDP2 shards the stacked expert weights like any other.
"""

import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from lunaris import LunarisCodex, LunarisCodexConfig

pytestmark = pytest.mark.slow
STEPS = 3
IDLE = 2  # the expert that never receives a token


def moc_config() -> LunarisCodexConfig:
    return LunarisCodexConfig(vocab_size=64, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, max_seq_len=16,
                              multiple_of=16, n_experts=3, top_k=1, collab_mode="mha", n_reasoning_steps=2,
                              capacity_factor=1.25)


def force_idle_expert(model: LunarisCodex) -> None:
    """Router rows v, -v, 0: one of the first two logits is always positive, so top-1 never picks expert 2.

    v is long (10·N(0, 1)) so that the few AdamW steps of the test (lr 1e-3, which move expert 2's row by the
    aux losses' gradient) cannot lift expert 2's logit above |v·x| for any token.
    """
    with torch.no_grad():
        for block in model.blocks:
            weight = block.ffn.router.weight                     # (E, D)
            direction = 10 * torch.randn(weight.shape[1], generator=torch.Generator().manual_seed(1))
            weight.copy_(torch.stack([direction, -direction, torch.zeros_like(direction)]))


def train_steps(model, optimizer, rank: int) -> list:
    """STEPS steps on rank-specific random tokens; returns [(loss, idle expert utilization per layer)]."""
    generator = torch.Generator().manual_seed(100 + rank)
    history = []
    for _ in range(STEPS):
        idx = torch.randint(0, 64, (2, 16), generator=generator)
        out = model(idx, idx.roll(-1, dims=1))
        optimizer.zero_grad(set_to_none=True)
        out.loss.backward()
        optimizer.step()
        idle = [float(v) for k, v in out.metrics.items() if k.endswith(f"/e{IDLE}")]
        history.append((float(out.loss.detach()), idle))
    return history


def worker(rank: int, world_size: int, port: int, results):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world_size)
    try:
        from torch.nn.parallel import DistributedDataParallel as DDP
        torch.manual_seed(0)  # identical initial weights on both ranks
        model = LunarisCodex(moc_config())
        force_idle_expert(model)
        ddp = DDP(model, find_unused_parameters=False)
        history = train_steps(ddp, torch.optim.AdamW(ddp.parameters(), lr=1e-3), rank)
        idle_grad = model.blocks[0].ffn.experts.gate_up.grad[IDLE].abs().max().item()
        busy_grad = model.blocks[0].ffn.experts.gate_up.grad[0].abs().max().item()
        flat = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
        gathered = [torch.zeros_like(flat) for _ in range(world_size)]
        dist.all_gather(gathered, flat)
        ddp_in_sync = all(torch.equal(gathered[0], g) for g in gathered)

        from lunaris.train.distributed import DistInfo, apply_fsdp
        torch.manual_seed(0)
        sharded = LunarisCodex(moc_config())
        force_idle_expert(sharded)
        apply_fsdp(sharded, DistInfo(rank, rank, world_size, torch.device("cpu")))
        fsdp_history = train_steps(sharded, torch.optim.AdamW(sharded.parameters(), lr=1e-3), rank)
        results[rank] = dict(ddp=history, idle_grad=idle_grad, busy_grad=busy_grad, in_sync=ddp_in_sync,
                             fsdp=fsdp_history)
        dist.barrier()  # both ranks done before teardown (see lunaris.train.distributed.teardown_distributed)
    except Exception as exc:  # reported by the test, with the rank
        results[rank] = dict(error=f"{type(exc).__name__}: {exc}")
        raise
    finally:
        dist.destroy_process_group()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_ddp_and_fsdp2_with_an_idle_expert():
    world_size = 2
    with mp.Manager() as manager:
        results = manager.dict()
        mp.spawn(worker, args=(world_size, free_port(), results), nprocs=world_size, join=True)
        results = dict(results)
    for rank in range(world_size):
        r = results[rank]
        assert "error" not in r, f"rank {rank}: {r.get('error')}"
        for mode in ("ddp", "fsdp"):
            assert len(r[mode]) == STEPS
            for loss, idle_util in r[mode]:
                assert torch.isfinite(torch.tensor(loss)), (mode, rank, loss)
                assert idle_util == [0.0, 0.0], f"{mode}: expert {IDLE} received tokens: {idle_util}"
        assert r["idle_grad"] == 0.0 and r["busy_grad"] > 0.0   # a real zero gradient, not a missing one
        assert r["in_sync"], "DDP ranks diverged: gradients were not averaged"
    # different data per rank, averaged gradients: the ranks' losses differ but their weights agree
    assert results[0]["ddp"][0][0] != results[1]["ddp"][0][0]
