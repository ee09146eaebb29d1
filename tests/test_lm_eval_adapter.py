"""lm-evaluation-harness: the `lunaris` model scores a local task as `lunaris eval` does, and as lm-eval's own `hf`
model scores the exported checkpoint. Everything is local: a tiny checkpoint, a JSONL file and a task YAML."""

import dataclasses
import json
from types import SimpleNamespace

import pytest
import torch
from conftest import byte_level_tokenizer, tiny_model_config

from lunaris import LunarisCodex, TrainConfig

pytest.importorskip("lm_eval", reason="lm-evaluation-harness is not installed: pip install 'lunaris[eval]'")
pytest.importorskip("transformers", reason="the hf comparison needs transformers: pip install 'lunaris[hf]'")

TASK_YAML = """task: local_mc
dataset_path: json
dataset_kwargs:
  data_files:
    test: {jsonl}
  cache_dir: {cache}
output_type: multiple_choice
test_split: test
doc_to_text: context
doc_to_choice: choices
doc_to_target: label
metric_list:
  - metric: acc
  - metric: acc_norm
"""


@pytest.fixture(scope="module")
def local(tmp_path_factory):
    root = tmp_path_factory.mktemp("lm_eval")
    torch.manual_seed(0)
    model = LunarisCodex(tiny_model_config(vocab_size=320, max_seq_len=128)).eval()
    with torch.no_grad():
        model.wte.weight.mul_(30.0)  # tied LM head: sharp logits, so no two choices score nearly alike
    run = root / "run"
    run.mkdir()
    config = dataclasses.asdict(TrainConfig(model=model.config, batch_size=4))
    torch.save({"model": model.state_dict(), "config": config, "step": 2}, run / "latest_checkpoint.pt")
    byte_level_tokenizer().save(str(run / "tokenizer.json"))
    words = "the quick brown fox jumps over the lazy dog hello world".split()
    generator = torch.Generator().manual_seed(1)

    def phrase(n):
        return " ".join(words[int(i)] for i in torch.randint(0, len(words), (n,), generator=generator))
    rows = [{"context": phrase(6), "choices": [phrase(1 + (i + k) % 3) for k in range(4)], "label": i % 4}
            for i in range(12)]
    jsonl = root / "local_mc.jsonl"
    jsonl.write_text("".join(json.dumps(row) + "\n" for row in rows))
    (root / "tasks").mkdir()
    (root / "tasks" / "local_mc.yaml").write_text(TASK_YAML.format(jsonl=jsonl, cache=root / "datasets"))
    return SimpleNamespace(root=root, run=run, jsonl=jsonl, model=model)


def lm_eval_scores(model, model_args, local):
    from lm_eval import simple_evaluate
    from lm_eval.tasks import TaskManager
    out = simple_evaluate(model=model, model_args=model_args, tasks=["local_mc"], device="cpu", batch_size=4,
                          task_manager=TaskManager(include_path=str(local.root / "tasks"), include_defaults=False),
                          log_samples=True)
    metrics = out["results"]["local_mc"]
    samples = sorted(out["samples"]["local_mc"], key=lambda s: s["doc_id"])
    logliks = [float(ll) for sample in samples for ll, _ in sample["filtered_resps"]]
    return metrics["acc,none"], metrics["acc_norm,none"], logliks


def test_lunaris_model_in_lm_eval_equals_lunaris_eval_and_the_exported_model_under_hf(local, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    import lunaris.lm_eval_adapter  # noqa: F401  registers the `lunaris` model
    from lunaris.evaluate import run_task_eval
    from lunaris.export import export_checkpoint
    ours = run_task_eval(local.run, [f"local_mc={local.jsonl}"], device="cpu")["tasks"]["local_mc"]
    acc, acc_norm, logliks = lm_eval_scores("lunaris", {"checkpoint": str(local.run)}, local)
    assert (acc, acc_norm) == (ours["acc"], ours["acc_norm"])
    assert 0 < acc < 1 or 0 < acc_norm < 1  # the comparison is not between two constants

    export_checkpoint(local.run, tmp_path / "hf", fmt="llama")
    hf_acc, hf_acc_norm, hf_logliks = lm_eval_scores("hf", {"pretrained": str(tmp_path / "hf"), "dtype": "float32"},
                                                     local)
    assert (hf_acc, hf_acc_norm) == (acc, acc_norm)
    assert hf_logliks == pytest.approx(logliks, abs=1e-3)
    gaps = [abs(a - b) for a, b in zip(logliks, logliks[1:])]
    assert max(gaps) > 1.0  # choices far apart: equal accuracies are not luck


def test_rolling_loglikelihood_and_generate_until(local):
    from lunaris.lm_eval_adapter import LunarisLM
    lm = LunarisLM(checkpoint=str(local.run), device="cpu", batch_size="2")
    model, eot = local.model, 0
    text = "sphinx of black quartz, judge my vow! " * 5                # more than 128 tokens: two windows
    tokens = lm.tok_encode(text)
    assert 128 < len(tokens) < 256

    def logprob_sum(inputs, targets):
        with torch.no_grad():
            logits = model(torch.tensor([inputs])).logits[0, -len(targets):]
        return logits.log_softmax(-1).gather(1, torch.tensor(targets)[:, None]).sum().item()
    # every token predicted once, each with as much context as fits: <eot> + the first 127, then the rest
    by_hand = logprob_sum([eot] + tokens[:127], tokens[:128]) + \
        logprob_sum(tokens[len(tokens) - 129:len(tokens) - 1], tokens[128:])
    short = "hello world"
    (rolling_long, rolling_short) = lm.loglikelihood_rolling([SimpleNamespace(args=(text,)),
                                                              SimpleNamespace(args=(short,))])
    assert rolling_long == pytest.approx(by_hand, abs=1e-3)
    assert rolling_short == pytest.approx(logprob_sum([eot] + lm.tok_encode(short)[:-1], lm.tok_encode(short)),
                                          abs=1e-4)

    prompt = "hello world the"
    ids = lm.tok_encode(prompt)
    greedy = model.generate(torch.tensor([ids]), max_new_tokens=6, temperature=0.0)[0, len(ids):].tolist()
    greedy = greedy[:greedy.index(eot)] if eot in greedy else greedy
    text = lm.tok_decode(greedy)
    stop = text[2:4] if len(text) > 4 else None
    (out,) = lm.generate_until([SimpleNamespace(args=(prompt, {"until": [stop] if stop else [], "max_gen_toks": 6}))])
    assert out == (text.split(stop)[0] if stop else text)
