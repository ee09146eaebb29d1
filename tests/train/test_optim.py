"""Optimizers and schedules: Muon's parameter groups and update, the LR schedules, resume with Muon."""

import math

import pytest
import torch
from conftest import tiny_model_config

from lunaris import LunarisCodex, TrainConfig
from lunaris.train import Trainer, train
from lunaris.train.muon import Muon, muon_parameters, newton_schulz
from lunaris.train.optim import OPTIMIZERS, CombinedOptimizer, build_optimizer, lr_at

# the reference implementation our Muon is checked against (torch >= 2.9); our Muon itself runs on any torch
needs_torch_muon = pytest.mark.skipif(not hasattr(torch.optim, "Muon"), reason="torch.optim.Muon needs torch >= 2.9")


def test_muon_takes_the_hidden_matrices_and_adamw_everything_else():
    model = LunarisCodex(tiny_model_config(n_experts=4, top_k=2, collab_mode="simple", tie_embeddings=False))
    optimizer = build_optimizer(model, TrainConfig(model=model.config, optimizer="muon"), "cpu")
    assert isinstance(optimizer, CombinedOptimizer)
    names = {id(p): n for n, p in model.named_parameters()}
    by_group = {}
    for group in optimizer.param_groups:
        by_group.setdefault(group["name"], []).extend(names[id(p)] for p in group["params"])
    every = [n for names_ in by_group.values() for n in names_]
    assert sorted(every) == sorted(names.values())                       # each parameter exactly once
    muon = set(by_group["muon"])
    assert {"blocks.0.attn.qkv.weight", "blocks.0.attn.proj.weight"} <= muon
    assert any(n.endswith("gate_up") for n in muon) and any(n.endswith("down") for n in muon)  # stacked experts
    assert not muon & {"wte.weight", "lm_head.weight"}
    assert not any("router" in n or "norm" in n for n in muon)
    assert set(by_group["router"]) == {n for n in names.values() if "router" in n}
    assert {"wte.weight", "lm_head.weight"} <= set(by_group["decay"])
    scales = {g["name"]: g["lr_scale"] for g in optimizer.param_groups}
    assert scales["muon"] == pytest.approx(0.02 / 3e-4) and scales["router"] == 0.5


@needs_torch_muon
@pytest.mark.parametrize("stacked", [False, True], ids=["matrix", "stacked-experts"])
def test_our_muon_updates_each_matrix_like_torch_muon(stacked, monkeypatch):
    torch.manual_seed(0)
    import lunaris.train.muon as muon_module
    real = muon_module.newton_schulz  # torch's runs in bf16 on every device: compare in bf16
    monkeypatch.setattr(muon_module, "newton_schulz", lambda g, steps, dtype: real(g, steps, torch.bfloat16))
    if stacked:
        ours_param = torch.nn.Parameter(torch.randn(3, 8, 12))                     # (E, in, out)
        singles = [torch.nn.Parameter(ours_param.detach()[e].T.clone()) for e in range(3)]  # (out, in)
    else:
        ours_param = torch.nn.Parameter(torch.randn(12, 8))                        # (out, in)
        singles = [torch.nn.Parameter(ours_param.detach().clone())]
    ours = Muon([ours_param], lr=0.02, weight_decay=0.1, momentum=0.95)
    reference = torch.optim.Muon(singles, lr=0.02, weight_decay=0.1, momentum=0.95, nesterov=True)
    for _ in range(2):                                                             # two steps: momentum matters
        grad = torch.randn_like(ours_param)
        ours_param.grad = grad.clone()
        for e, single in enumerate(singles):
            single.grad = (grad[e].T if stacked else grad).clone()
        ours.step()
        reference.step()
    for e, single in enumerate(singles):
        got = ours_param.detach()[e].T if stacked else ours_param.detach()
        torch.testing.assert_close(got, single.detach(), atol=1e-5, rtol=0)


def test_muon_orthogonalizes_in_fp32_on_cpu():
    grad = torch.randn(2, 16, 24)
    ortho = newton_schulz(grad, 5, torch.float32)
    assert ortho.dtype == torch.float32
    singular = torch.linalg.svdvals(ortho)
    assert 0.5 < singular.min() and singular.max() < 1.3  # roughly orthogonal (Muon's iteration: S' ~ U(0.5, 1.5))


@needs_torch_muon
def test_batched_newton_schulz_matches_torch_per_matrix():
    from torch.optim._muon import _zeropower_via_newtonschulz
    grad = torch.randn(4, 16, 24)
    ours = newton_schulz(grad, 5, torch.bfloat16)
    for e in range(4):
        expected = _zeropower_via_newtonschulz(grad[e], (3.4445, -4.775, 2.0315), 5, 1e-7)
        torch.testing.assert_close(ours[e].float(), expected.float(), atol=2e-2, rtol=0)


def test_muon_parameters_of_a_dense_model_are_the_block_matrices():
    model = LunarisCodex(tiny_model_config())
    names = {id(p): n for n, p in model.named_parameters()}
    assert sorted(names[id(p)] for p in muon_parameters(model)) == sorted(
        n for n, p in model.named_parameters() if n.startswith("blocks.") and p.dim() == 2)


@pytest.mark.parametrize("model", [{}, {"n_experts": 4, "top_k": 2}], ids=["dense", "moc"])
def test_muon_run_stopped_and_resumed_matches_the_uninterrupted_run(tmp_path, train_config, helpers, model):
    common = dict(model=model, optimizer="muon", max_steps=8, warmup_steps=2, save_interval=4, lr_schedule="wsd")
    straight = train(train_config(tmp_path / "straight", **common))
    assert straight.step == 8
    train(train_config(tmp_path / "resumed", **{**common, "max_steps": 4}))
    train(train_config(tmp_path / "resumed", **common))                  # resumes from step 4 with Muon's state
    a, b = helpers.read_metrics(tmp_path / "straight"), helpers.read_metrics(tmp_path / "resumed")
    assert [r["loss/total"] for r in a] == [r["loss/total"] for r in b]
    helpers.assert_weights_close(helpers.final_weights(tmp_path / "straight"),
                                 helpers.final_weights(tmp_path / "resumed"))
    losses = [r["loss/total"] for r in a]
    assert losses[-1] < losses[0]


def test_a_muon_checkpoint_does_not_resume_an_adamw_run(tmp_path, train_config):
    train(train_config(tmp_path, optimizer="muon", max_steps=2))
    with pytest.raises(Exception, match="optimizer"):
        Trainer(train_config(tmp_path, max_steps=4)).close()


def test_schedules_warm_up_then_decay_to_min_lr():
    def config(schedule):
        return TrainConfig(learning_rate=1.0, min_lr=0.1, warmup_steps=10, max_steps=110, lr_schedule=schedule,
                           decay_fraction=0.2)
    for schedule in ("cosine", "linear", "wsd"):
        c = config(schedule)
        assert lr_at(0, c) == pytest.approx(1 / 11) and lr_at(9, c) == pytest.approx(10 / 11)
        assert lr_at(10, c) == pytest.approx(1.0)                            # the peak right after warmup
        assert lr_at(110, c) == lr_at(500, c) == pytest.approx(0.1)          # the floor at the end and after
    assert lr_at(60, config("cosine")) == pytest.approx(0.1 + 0.5 * (1 + math.cos(math.pi / 2)) * 0.9)
    assert lr_at(60, config("linear")) == pytest.approx(1.0 - 0.5 * 0.9)
    wsd = config("wsd")                                                     # decay over the last 22 steps
    assert lr_at(60, wsd) == lr_at(88, wsd) == pytest.approx(1.0)
    assert lr_at(99, wsd) == pytest.approx(1.0 - 11 / 22 * 0.9)


def test_optimizer_and_schedule_settings_are_checked():
    problems = TrainConfig(optimizer="adam", lr_schedule="step", decay_fraction=0.0, muon_lr=0).problems()
    assert any("optimizer must be one of adamw, muon" in p for p in problems)
    assert any("lr_schedule must be one of cosine, wsd, linear" in p for p in problems)
    assert any("decay_fraction must be in (0, 1]" in p for p in problems)
    assert any("muon_lr must be positive" in p for p in problems)
    TrainConfig(optimizer="muon", parallelism="fsdp").validate()    # each process orthogonalizes its share


def test_the_registry_offers_exactly_the_configs_optimizer_choices():
    import lunaris.config as config_module
    choices = config_module.choices("optimizer") if hasattr(config_module, "choices") else config_module.OPTIMIZERS
    assert set(OPTIMIZERS) == set(choices)
    model = LunarisCodex(tiny_model_config())
    for name, factory in OPTIMIZERS.items():     # every factory builds an optimizer over every trainable parameter
        optimizer = factory(model, TrainConfig(model=model.config, optimizer=name), "cpu")
        seen = [id(p) for group in optimizer.param_groups for p in group["params"]]
        assert sorted(seen) == sorted(id(p) for p in model.parameters()) and all("lr_scale" in g
                                                                                 for g in optimizer.param_groups)


def test_adamw_groups_keep_the_models_parameter_order_and_configure_optimizers_is_the_same_optimizer():
    model = LunarisCodex(tiny_model_config(n_experts=4, top_k=2, tie_embeddings=False))
    built = build_optimizer(model, TrainConfig(model=model.config), "cpu")
    alias = model.configure_optimizers(weight_decay=0.1, learning_rate=3e-4)
    names = {id(p): n for n, p in model.named_parameters()}
    order = list(names.values())
    for a, b in zip(built.param_groups, alias.param_groups, strict=True):
        assert a["name"] == b["name"] and [names[id(p)] for p in a["params"]] == [names[id(p)] for p in b["params"]]
        listed = [names[id(p)] for p in a["params"]]
        assert listed == sorted(listed, key=order.index)    # the checkpoint's state order: as named_parameters
    decay = {g["name"]: [names[id(p)] for p in g["params"]] for g in built.param_groups}["decay"]
    assert decay[0] == "wte.weight" and decay[-1] == "lm_head.weight"


@pytest.mark.parametrize("optimizer", ["adamw", "muon"])
def test_a_resumed_run_takes_every_groups_hyperparameters_from_the_current_config(tmp_path, train_config, optimizer):
    model = {"n_experts": 4, "top_k": 2}
    train(train_config(tmp_path, model=model, optimizer=optimizer, max_steps=2))
    changed = dict(router_lr_scale=0.25, beta1=0.8, beta2=0.99, weight_decay=0.05, muon_lr=0.01, muon_momentum=0.9)
    trainer = Trainer(train_config(tmp_path, model=model, optimizer=optimizer, max_steps=3, **changed))
    try:
        groups = {g["name"]: g for g in trainer.optimizer.param_groups}
        assert groups["router"]["lr_scale"] == 0.25 and groups["decay"]["weight_decay"] == 0.05
        assert all(groups[n]["betas"] == (0.8, 0.99) for n in ("decay", "no_decay", "router"))
        if optimizer == "muon":
            assert groups["muon"]["momentum"] == 0.9 and groups["muon"]["lr_scale"] == pytest.approx(0.01 / 3e-3)
            assert groups["muon"]["weight_decay"] == pytest.approx(0.05 * 3e-3 / 0.01)
        state = trainer.optimizer.state                     # the moments are the checkpoint's
        assert state and all(float(s["step"]) == 2 for s in state.values() if "step" in s)
        assert trainer.run().step == 3
    finally:
        trainer.close()
