"""Fine-tuning on the trainer: the loss mask in the step and the held-out loss, init_from (weights only, a grown
vocabulary), resuming a fine-tuning run."""

import dataclasses
import json
import math

import numpy as np
import pytest
import torch
from conftest import byte_level_tokenizer, tiny_model_config

from lunaris import LunarisCodex, TrainConfig
from lunaris.data import ShardDataset
from lunaris.data.prepare import PrepareOptions, prepare
from lunaris.errors import CheckpointError, ConfigError, DataError
from lunaris.train import step as steps
from lunaris.train import train
from lunaris.train.checkpoint import load_checkpoint_file
from lunaris.train.evaluation import held_out_sums
from lunaris.train.init_from import fitted_weights, load_initial_weights
from lunaris.train.trainer import Trainer

WORDS = "hello world the quick brown fox jumps over lazy dog".split()
SEQ = 32


def conversations(n: int, seed: int = 0) -> list:
    """Short conversations whose reply follows from the question (the words in reverse), so a model can learn them."""
    rng = np.random.default_rng(seed)
    rows = []
    for _ in range(n):
        words = list(rng.choice(WORDS, int(rng.integers(1, 4))))
        rows.append({"messages": [{"role": "user", "content": " ".join(words)},
                                  {"role": "assistant", "content": " ".join(reversed(words))}]})
    return rows


@pytest.fixture(scope="module")
def base_run(tmp_path_factory):
    """A tiny base model trained 3 steps on text with the byte-level tokenizer (297 ids, model vocab 320)."""
    root = tmp_path_factory.mktemp("base")
    byte_level_tokenizer().save(str(root / "tokenizer.json"))
    docs = root / "docs"
    docs.mkdir()
    rng = np.random.default_rng(0)
    for i in range(20):
        (docs / f"d{i}.txt").write_text(" ".join(rng.choice(WORDS, 80)))
    prepare(PrepareOptions(sources=[docs], out=root / "data", tokenizer=root / "tokenizer.json", val_tokens=300,
                           progress=False))
    train(config(root / "run", root / "data", max_steps=3))
    return root


@pytest.fixture(scope="module")
def chat_data(tmp_path_factory, base_run):
    """Conversations prepared with the base run's tokenizer (extended: 301 ids), windows of SEQ, packed."""
    root = tmp_path_factory.mktemp("chat")
    with open(root / "chat.jsonl", "w") as f:
        for row in conversations(400):
            f.write(json.dumps(row) + "\n")
    prepare(PrepareOptions(sources=[root / "chat.jsonl"], out=root / "data", seq_len=SEQ, val_tokens=200,
                           tokenizer=base_run / "run" / "tokenizer.json", progress=False))
    return root / "data"


def config(out_dir, data_dir, model=None, **keys) -> TrainConfig:
    model_keys = dict(vocab_size=320, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, max_seq_len=SEQ,
                      multiple_of=16, **(model or {}))
    values = dict(model=model_keys, data_dir=str(data_dir), learning_rate=3e-3, warmup_steps=1, max_steps=4,
                  batch_size=4, save_interval=1000, log_interval=1, eval_interval=0, eval_batches=2, num_workers=0,
                  out_dir=str(out_dir), device="cpu", dtype="fp32", seed=7)
    values.update(keys)
    return TrainConfig.from_dict(values)


def grads_of(model) -> list:
    return [p.grad.clone() for p in model.parameters()]


def step_of(model, micro_batches, reduce_sum=None):
    """(loss/main, gradients) of one accumulated step, the parameters untouched."""
    model.zero_grad(set_to_none=True)
    kwargs = {} if reduce_sum is None else {"reduce_sum": reduce_sum}
    losses = steps.accumulate(model, micro_batches, torch.device("cpu"), torch.float32, **kwargs)
    return float(losses.main), grads_of(model)


# ---- the mask in the step --------------------------------------------------------------------------------------

def test_user_and_system_targets_change_neither_the_loss_nor_the_gradients(chat_data):
    x, y, mask = ShardDataset(chat_data, SEQ).get_batch([0, 1, 2, 3])
    assert 0 < int(mask.sum()) < mask.numel()
    model = LunarisCodex(tiny_model_config(vocab_size=320, max_seq_len=SEQ))
    loss, grads = step_of(model, [(x, y, mask)])
    changed = y.clone()
    untrained = (~mask) & (y != -1)
    changed[untrained] = (changed[untrained] + 7) % 300            # every user/system/role target replaced
    loss2, grads2 = step_of(model, [(x, changed, mask)])
    assert loss2 == loss and all(torch.equal(a, b) for a, b in zip(grads, grads2))
    trained = changed.clone()
    trained[mask] = (trained[mask] + 7) % 300                      # an assistant target does count
    assert step_of(model, [(x, trained, mask)])[0] != loss
    # and the loss is the mean over the assistant's tokens only
    logits = model(x).logits
    per_token = torch.nn.functional.cross_entropy(logits.flatten(0, 1), y.flatten(), reduction="none")
    expected = (per_token * mask.flatten()).sum() / mask.sum()
    assert math.isclose(loss, float(expected), rel_tol=1e-5)


def test_micro_batches_and_ranks_weigh_every_trained_token_the_same(chat_data):
    x, y, mask = ShardDataset(chat_data, SEQ).get_batch(list(range(8)))
    mask[:4, :10] = False                                            # the two halves hold different counts
    model = LunarisCodex(tiny_model_config(vocab_size=320, max_seq_len=SEQ))
    whole = step_of(model, [(x, y, mask)])
    split = step_of(model, [(x[:4], y[:4], mask[:4]), (x[4:], y[4:], mask[4:])])
    assert math.isclose(whole[0], split[0], rel_tol=1e-5)
    for a, b in zip(whole[1], split[1]):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5)
    # two ranks of 4 sequences: each weighs its tokens by the step's total over both; DDP averages the gradients
    total = torch.tensor([float(mask[:4].sum() + mask[4:].sum()), 2.0], dtype=torch.float64)
    ranks = [step_of(model, [(x[r:r + 4], y[r:r + 4], mask[r:r + 4])], reduce_sum=lambda t: total.clone())
             for r in (0, 4)]
    assert math.isclose((ranks[0][0] + ranks[1][0]) / 2, whole[0], rel_tol=1e-5)  # the trainer's mean over ranks
    for k, a in enumerate(whole[1]):
        torch.testing.assert_close((ranks[0][1][k] + ranks[1][1][k]) / 2, a, atol=1e-6, rtol=1e-5)


def test_the_held_out_loss_counts_the_trained_tokens_only(chat_data):
    dataset = ShardDataset(chat_data / "val", SEQ)
    batches = [dataset.get_batch([0, 1])]
    model = LunarisCodex(tiny_model_config(vocab_size=320, max_seq_len=SEQ)).eval()
    nats, tokens, count = held_out_sums(model, batches, torch.device("cpu")).tolist()
    x, y, mask = batches[0]
    per_token = torch.nn.functional.cross_entropy(model(x).logits.flatten(0, 1), y.flatten().clamp_min(0),
                                                  reduction="none")
    assert tokens == int(mask.sum()) and count == 1
    assert math.isclose(nats, float((per_token * mask.flatten()).sum()), rel_tol=1e-5)


# ---- init_from --------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("tie", [True, False], ids=["tied", "untied"])
def test_a_grown_vocabulary_keeps_the_old_rows_and_starts_the_new_ones_at_the_mean(tmp_path, tie):
    base = LunarisCodex(tiny_model_config(vocab_size=297, tie_embeddings=tie))
    run = tmp_path / "base"
    run.mkdir()
    torch.save({"model": base.state_dict(), "step": 5,
                "config": dataclasses.asdict(TrainConfig(model=base.config))}, run / "latest_checkpoint.pt")
    grown = LunarisCodex(tiny_model_config(vocab_size=320, tie_embeddings=tie))
    line = load_initial_weights(grown, run)
    assert "vocabulary grown from 297 to 320" in line
    for name in ("wte.weight", "lm_head.weight"):
        old, new = base.state_dict()[name], grown.state_dict()[name]
        assert torch.equal(new[:297], old)
        assert torch.allclose(new[297:], old.mean(dim=0).expand(23, -1))
    for name, value in base.state_dict().items():
        if name not in ("wte.weight", "lm_head.weight"):
            assert torch.equal(grown.state_dict()[name], value), name
    with pytest.raises(CheckpointError, match="model.vocab_size 200 is smaller than the checkpoint's 297"):
        fitted_weights(base.state_dict(), LunarisCodex(tiny_model_config(vocab_size=200, tie_embeddings=tie)), run)
    with pytest.raises(CheckpointError, match=r"wte.weight has shape .*only model.vocab_size may grow"):
        load_initial_weights(LunarisCodex(tiny_model_config(vocab_size=320, d_model=32, tie_embeddings=tie)), run)


def test_fine_tuning_starts_from_the_weights_with_a_fresh_optimizer_and_resumes_its_own_run(tmp_path, base_run,
                                                                                            chat_data):
    keys = dict(model={"attention_mask": "document"}, init_from=str(base_run / "run"), max_steps=4)
    trainer = Trainer(config(tmp_path / "sft", chat_data, **keys))
    try:
        base = load_checkpoint_file(base_run / "run", include_optimizer=False)["model"]
        assert all(torch.equal(trainer.model.state_dict()[k], v) for k, v in base.items())
        assert trainer.step == 0 and not trainer.optimizer.state and trainer.loader.epoch == 0
        assert trainer.initialized_from.startswith(f"the weights of {base_run / 'run'}")
        assert trainer.run().step == 4
    finally:
        trainer.close()
    assert (tmp_path / "sft" / "tokenizer_config.json").is_file()     # the chat template travels with the run
    # a run with checkpoints of its own resumes them: init_from no longer matters (here it does not even exist)
    again = config(tmp_path / "sft", chat_data, **{**keys, "init_from": str(tmp_path / "gone"), "max_steps": 6})
    assert train(again).step == 6


def test_a_stopped_fine_tuning_resumes_exactly(tmp_path, base_run, chat_data, helpers):
    keys = dict(model={"attention_mask": "document", "dropout": 0.1}, init_from=str(base_run / "run"),
                max_steps=8, save_interval=3, eval_interval=4)
    train(config(tmp_path / "straight", chat_data, **keys))
    trainer = Trainer(config(tmp_path / "resumed", chat_data, **keys))
    original = trainer.train_step

    def stop_after_three(index):
        if index == 2:
            trainer.request_stop("test")  # as SIGTERM during step 3: it finishes, saves, returns
        return original(index)

    trainer.train_step = stop_after_three
    try:
        assert trainer.run().step == 3
    finally:
        trainer.close()
    train(config(tmp_path / "resumed", chat_data, **keys))           # continues from step 3, not from init_from
    a, b = helpers.read_metrics(tmp_path / "straight"), helpers.read_metrics(tmp_path / "resumed")
    assert [r["step"] for r in b] == list(range(1, 9))
    assert [r["loss/total"] for r in a] == [r["loss/total"] for r in b]
    assert [r.get("val/loss") for r in a] == [r.get("val/loss") for r in b]
    helpers.assert_weights_close(helpers.final_weights(tmp_path / "straight"),
                                 helpers.final_weights(tmp_path / "resumed"))


def test_fine_tuning_learns_the_replies(tmp_path, base_run, chat_data):
    keys = dict(model={"attention_mask": "document"}, init_from=str(base_run / "run"), max_steps=40,
                learning_rate=1e-2, eval_interval=40, log_interval=40)
    result = train(config(tmp_path / "learn", chat_data, **keys))
    base = train(config(tmp_path / "base-eval", chat_data, **{**keys, "max_steps": 1, "learning_rate": 1e-9,
                                                                  "eval_interval": 1}))
    assert result.last_metrics["val/loss"] < base.last_metrics["val/loss"] - 0.5


def test_data_of_another_tokenizer_and_the_wrong_attention_are_refused_before_training(tmp_path, base_run,
                                                                                       chat_data):
    with pytest.raises(ConfigError, match="set model.attention_mask: document"):
        train(config(tmp_path / "causal", chat_data, init_from=str(base_run / "run")))
    other = tmp_path / "other"
    with open(tmp_path / "chat.jsonl", "w") as f:
        f.write(json.dumps(conversations(1)[0]) + "\n")
    prepare(PrepareOptions(sources=[tmp_path / "chat.jsonl"], out=other, vocab_size=270, seq_len=SEQ, val_tokens=0,
                           progress=False))
    with pytest.raises(DataError, match="not the tokenizer of .* nor an extension of it"):
        train(config(tmp_path / "mismatch", other, model={"attention_mask": "document"},
                     init_from=str(base_run / "run")))


def test_training_without_init_from_is_unchanged(tmp_path, base_run):
    """A config without init_from draws its own weights: the same as before the key existed."""
    a = Trainer(config(tmp_path / "a", base_run / "data"))
    try:
        torch.manual_seed(a.config.seed)
        reference = LunarisCodex(a.config.model)
        assert all(torch.equal(a.model.state_dict()[k], v) for k, v in reference.state_dict().items())
        assert a.initialized_from is None
    finally:
        a.close()


@pytest.mark.slow
def test_two_processes_fine_tune_exactly_as_one(tmp_path, base_run, chat_data, helpers):
    """DDP under torchrun: the ranks' batches hold different numbers of assistant tokens, and every one of them
    weighs the same in the step, so two processes of batch 4 train as one process of batch 8."""
    keys = dict(model={"attention_mask": "document"}, init_from=str(base_run / "run"), max_steps=3, warmup_steps=0,
                learning_rate=3e-3, min_lr=3e-3, eval_interval=3)
    train(config(tmp_path / "one", chat_data, batch_size=8, **keys))
    path = helpers.write_yaml(config(tmp_path / "two", chat_data, batch_size=4, **keys), tmp_path / "two.yaml")
    done = helpers.torchrun(["-m", "lunaris", "train", str(path)])
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    one, two = helpers.read_metrics(tmp_path / "one"), helpers.read_metrics(tmp_path / "two")
    assert [r["step"] for r in two] == [1, 2, 3]
    for a, b in zip(one, two):
        for key in ("loss/total", "grad_norm", "val/loss"):
            if key in a:
                assert math.isclose(a[key], b[key], rel_tol=2e-5), (a["step"], key, a[key], b[key])
    helpers.assert_weights_close(helpers.final_weights(tmp_path / "one"), helpers.final_weights(tmp_path / "two"),
                                 atol=2e-5)


def test_eval_scores_a_base_model_on_conversations_as_its_fine_tuning_starts(tmp_path, base_run, chat_data):
    """`lunaris eval --data` of conversations for a model that lacks the chat tokens: its vocabulary grown as
    init_from grows it, each conversation read alone, the assistant's tokens scored."""
    from lunaris.data import sequential_batches
    from lunaris.evaluate import run_eval
    run = tmp_path / "small"
    run.mkdir()
    (run / "tokenizer.json").write_bytes((base_run / "run" / "tokenizer.json").read_bytes())
    torch.manual_seed(0)
    small = LunarisCodex(tiny_model_config(vocab_size=297, max_seq_len=SEQ))        # the base tokenizer's ids only
    torch.save({"model": small.state_dict(), "config": dataclasses.asdict(TrainConfig(model=small.config)),
                "step": 3}, run / "latest_checkpoint.pt")
    result = run_eval(run, data=chat_data, device="cpu", batch_size=4)
    start = LunarisCodex(tiny_model_config(vocab_size=320, max_seq_len=SEQ, attention_mask="document",
                                           document_separator_id=0))
    load_initial_weights(start, run)
    val = ShardDataset(chat_data / "val", SEQ)
    nats, tokens, _ = held_out_sums(start.eval(), sequential_batches(val, 4), torch.device("cpu")).tolist()
    manifest = json.loads((chat_data / "manifest.json").read_text())
    assert result["tokens"] == tokens == manifest["splits"]["val"]["loss_mask"]["trained_tokens"]
    assert math.isclose(result["loss"], nats / tokens, rel_tol=1e-6)
    causal = LunarisCodex(tiny_model_config(vocab_size=320, max_seq_len=SEQ))     # reading across conversations
    load_initial_weights(causal, run)
    assert held_out_sums(causal.eval(), sequential_batches(val, 4), torch.device("cpu"))[0] != nats


def test_a_moc_model_fine_tunes_from_its_checkpoint(tmp_path, base_run, chat_data):
    moc = {"n_experts": 4, "top_k": 2, "collab_mode": "simple", "n_reasoning_steps": 2}
    train(config(tmp_path / "moc-base", base_run / "data", model=moc, max_steps=2))
    keys = dict(model={**moc, "attention_mask": "document"}, init_from=str(tmp_path / "moc-base"), max_steps=2,
                eval_interval=2)
    trainer = Trainer(config(tmp_path / "moc-sft", chat_data, **keys))
    try:
        base = load_checkpoint_file(tmp_path / "moc-base", include_optimizer=False)["model"]
        assert base.keys() == trainer.model.state_dict().keys()   # router, experts, IRL: every weight taken
        assert all(torch.equal(trainer.model.state_dict()[k], v) for k, v in base.items())
        result = trainer.run()
    finally:
        trainer.close()
    assert result.step == 2 and math.isfinite(result.last_metrics["val/loss"])
