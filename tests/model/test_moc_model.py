"""MoC inside LunarisCodex: layer placement, aux loss, causality, checkpointing, optimizer groups, training."""

import textwrap

import pytest
import torch
from conftest import tiny_model_config

from lunaris import LunarisCodex, load_config
from lunaris.model.layers import ReasoningFeedForward
from lunaris.model.moc import MHACollaboration, MoCLayer

# The configuration example of the MoC seed (shared/seeds/001_…), verbatim.
SEED_MOC_YAML = textwrap.dedent("""\
    model:
      vocab_size: 50304
      d_model: 1024
      n_layers: 20
      n_heads: 16
      n_kv_heads: 4
      max_seq_len: 2048
      rope_theta: 10000.0
      dropout: 0.05

      # MoC configuration
      n_experts: 8
      top_k: 2
      aux_loss_weight: 1.0e-2
      capacity_factor: 1.25
      router_z_loss_weight: 1.0e-3

      # IRL configuration (NEW in v4)
      n_reasoning_steps: 3              # Number of iterative reasoning steps per expert

      # Collaboration mode
      use_simple_collab: false          # set true to enable the simple 2-pass collab
      simple_collab_dropout: 0.1

      # Engineering
      use_gradient_checkpointing: true

    data_dir: "data/"
    learning_rate: 3.0e-4
    weight_decay: 0.1
    beta1: 0.9
    beta2: 0.95
    warmup_steps: 2000
    max_steps: 200000

    batch_size: 16
    gradient_accumulation_steps: 4
    grad_clip: 1.0

    compile_model: true
    device: "cuda"
    out_dir: "checkpoints/exp-mocv4-irl"
    save_interval: 1000
    log_interval: 20

    wandb_project: "lunaris-codex-moc-v4"
    wandb_run_name: "mocv4-irl-1024d-8x-top2-3steps"
    """)

SHRINK = {"model.vocab_size": 64, "model.d_model": 32, "model.n_layers": 2, "model.n_heads": 4,
          "model.n_kv_heads": 2, "model.max_seq_len": 16, "model.multiple_of": 16}


def moc_model(**overrides) -> LunarisCodex:
    keys = dict(n_experts=4, top_k=2, collab_mode="mha", n_reasoning_steps=2, capacity_factor=1.25,
                simple_collab_dropout=0.0)
    keys.update(overrides)
    return LunarisCodex(tiny_model_config(**keys))


def test_the_seed_moc_yaml_example_builds(tmp_path):
    path = tmp_path / "train.yaml"
    path.write_text(SEED_MOC_YAML)
    config = load_config(path)
    with torch.device("meta"):   # the full 20-layer model, without allocating its weights
        model = LunarisCodex(config.model)
    layers = [block.ffn for block in model.blocks]
    assert all(isinstance(layer, MoCLayer) for layer in layers) and len(layers) == 20
    assert all(isinstance(layer.collab, MHACollaboration) for layer in layers)   # use_simple_collab: false
    assert layers[0].experts.gate_up.shape == (8, 1024, 2 * config.model.ffn_hidden)
    assert layers[0].experts.steps == 3 and config.model.use_gradient_checkpointing
    assert model.num_params() > 1e9 and model.flops_per_token() > 0
    # the same file, shrunk, trains a step: forward with capacity, checkpointing and collaboration
    small = LunarisCodex(load_config(path, overrides=SHRINK).model).train()
    idx = torch.randint(0, 64, (2, 16))
    out = small(idx, idx)
    out.loss.backward()
    assert torch.isfinite(out.loss) and out.aux_loss > 0


def test_moc_every_places_moc_layers_and_aux_loss_is_their_mean():
    model = moc_model(n_layers=4, moc_every=2, aux_loss_weight=1.0, router_z_loss_weight=1e-3)
    kinds = [type(block.ffn) for block in model.blocks]
    assert kinds == [ReasoningFeedForward, MoCLayer, ReasoningFeedForward, MoCLayer]
    aux_by_layer = []
    for block in model.blocks[1::2]:
        block.ffn.register_forward_hook(lambda module, args, output: aux_by_layer.append(output[1]))
    idx = torch.randint(0, 128, (2, 16))
    out = model(idx, idx)
    assert len(aux_by_layer) == 2 and aux_by_layer[0] != aux_by_layer[1]
    torch.testing.assert_close(out.aux_loss, (aux_by_layer[0] + aux_by_layer[1]) / 2)
    torch.testing.assert_close(out.loss, out.main_loss + out.aux_loss)
    assert {"experts/util_layer1/e0", "experts/util_layer3/e3", "experts/drop_rate_layer3"} <= set(out.metrics)
    assert "experts/util_layer0/e0" not in out.metrics


def test_router_parameters_get_their_own_optimizer_group():
    model = moc_model(n_layers=2)
    optimizer = model.configure_optimizers(weight_decay=0.1, learning_rate=1e-3)
    groups = {group["name"]: group for group in optimizer.param_groups}
    routers = {id(block.ffn.router.weight) for block in model.blocks}
    assert {id(p) for p in groups["router"]["params"]} == routers
    assert groups["router"]["lr_scale"] == 0.5 and groups["router"]["weight_decay"] == 0.0
    stacked = {id(block.ffn.experts.gate_up) for block in model.blocks}
    assert stacked <= {id(p) for p in groups["decay"]["params"]}


@pytest.mark.parametrize("mode", ["none", "mha", "simple"])
def test_moc_models_are_causal_when_dropless(mode):
    """Changing tokens after position t leaves logits up to t unchanged (eval: dropless)."""
    model = moc_model(collab_mode=mode, n_layers=2).eval()
    idx = torch.randint(0, 128, (2, 16))
    changed = idx.clone()
    changed[:, 10:] = torch.randint(0, 128, (2, 6))
    with torch.no_grad():
        a, b = model(idx).logits, model(changed).logits
    torch.testing.assert_close(a[:, :10], b[:, :10], rtol=1e-5, atol=1e-5)
    assert not torch.allclose(a[:, 10:], b[:, 10:])


def test_cached_generation_matches_full_forward_decoding():
    model = moc_model(n_layers=2, collab_mode="simple").eval()
    prompt = torch.randint(0, 128, (2, 5))
    cached = model.generate(prompt, max_new_tokens=6, temperature=0.0)
    seq = prompt
    with torch.no_grad():
        for _ in range(6):
            seq = torch.cat([seq, model(seq).logits[:, -1].argmax(-1, keepdim=True)], dim=1)
    assert torch.equal(cached, seq)


def test_gradient_checkpointing_gives_the_same_loss_and_gradients(monkeypatch):
    # a fresh process: the grouped-matmul probe runs inside the first checkpointed forward
    monkeypatch.setattr("lunaris.model.moc._GROUPED_MM_SUPPORT", {})
    results = []
    for checkpointing in (True, False):
        torch.manual_seed(0)
        model = moc_model(use_gradient_checkpointing=checkpointing, router_jitter=0.1).train()
        idx = torch.randint(0, 128, (2, 16), generator=torch.Generator().manual_seed(1))
        torch.manual_seed(2)   # same jitter noise; checkpointing replays it in the recomputation
        out = model(idx, idx)
        out.loss.backward()
        results.append((out.loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}))
    (loss_a, grads_a), (loss_b, grads_b) = results
    torch.testing.assert_close(loss_a, loss_b)
    for name in grads_a:
        torch.testing.assert_close(grads_a[name], grads_b[name], rtol=1e-5, atol=1e-7, msg=name)


def test_a_tiny_moc_model_learns():
    torch.manual_seed(0)
    model = moc_model(n_layers=2, collab_mode="simple", vocab_size=64).train()
    optimizer = model.configure_optimizers(weight_decay=0.0, learning_rate=3e-3)
    pattern = torch.randperm(64)[:24]
    losses = []
    for _ in range(25):
        start = torch.randint(0, 24, (4,))
        idx = torch.stack([pattern.roll(-int(s))[:17] for s in start])    # (4, 17): windows of a cycle
        out = model(idx[:, :-1], idx[:, 1:])
        optimizer.zero_grad()
        out.loss.backward()
        optimizer.step()
        losses.append(out.main_loss.item())
    assert sum(losses[-3:]) / 3 < 0.6 * sum(losses[:3]) / 3, losses
