"""Downstream tasks (`lunaris eval --tasks`): the scores are lm-evaluation-harness's, computed right, from files."""

import dataclasses
import json
import math
import sysconfig
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from conftest import byte_level_tokenizer, tiny_model_config

from lunaris import LunarisCodex, TrainConfig
from lunaris.cli import main
from lunaris.errors import LunarisError
from lunaris.tasks import (
    Example,
    Layout,
    Task,
    encode_pair,
    evaluate_tasks,
    load_task,
    parse_spec,
    parse_specs,
    score,
)
from lunaris.tasks.embedded import HELD_OUT_GLOBS, embedded_task
from lunaris.tasks.scoring import encode_task, token_encoder


def save_run(run_dir: Path, model: LunarisCodex) -> Path:
    run_dir.mkdir(parents=True)
    config = dataclasses.asdict(TrainConfig(model=model.config, batch_size=4))
    torch.save({"model": model.state_dict(), "config": config, "step": 5}, run_dir / "latest_checkpoint.pt")
    byte_level_tokenizer().save(str(run_dir / "tokenizer.json"))
    return run_dir


def write_jsonl(path: Path, rows) -> Path:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


# ---- the numbers --------------------------------------------------------------------------------------

class BigramModel(torch.nn.Module):
    """logits[t] = TABLE[token t]: every log-likelihood can be computed by hand."""

    def __init__(self, table: torch.Tensor, max_seq_len: int):
        super().__init__()
        self.wte = torch.nn.Embedding(*table.shape)          # scoring reads the device from wte.weight
        self.table = table
        self.config = SimpleNamespace(max_seq_len=max_seq_len)

    def forward(self, idx):
        return SimpleNamespace(logits=self.table[idx])


CHARS = " abcde"


def char_encode(text: str) -> list:
    return [CHARS.index(c) for c in text]


def log_prob(table, previous: str, following: str) -> float:
    """log softmax(TABLE[previous])[following], by hand."""
    row = [float(v) for v in table[CHARS.index(previous)]]
    return row[CHARS.index(following)] - math.log(sum(math.exp(v) for v in row))


def test_a_hand_computed_multiple_choice_example_matches():
    table = torch.tensor([[0.1 * ((3 * i + 5 * j) % 7) for j in range(6)] for i in range(6)])
    model = BigramModel(table, max_seq_len=4)
    # context "abab" + " " + choice; the window keeps the last max_seq_len + 1 = 5 tokens, so the model reads
    # "ab c" (or "b dd"): a left-truncated context, and positions that must be right for the numbers to match
    task = Task("hand", "multiple_choice", [Example("abab", ("c", "dd", "e"), label=1)], "test")
    pairs = encode_task(task, char_encode, None, max_seq_len=4)
    assert pairs[1] == (char_encode("abab"), char_encode(" dd"))
    by_hand = [log_prob(table, "b", " ") + log_prob(table, " ", "c"),
               log_prob(table, "b", " ") + log_prob(table, " ", "d") + log_prob(table, "d", "d"),
               log_prob(table, "b", " ") + log_prob(table, " ", "e")]
    scores = score(model, pairs, batch_size=2)
    assert scores[0].tolist() == pytest.approx(by_hand, abs=1e-5)
    result = evaluate_tasks(model, [task], [pairs], batch_size=3)["hand"]
    assert result["acc"] == float(max(range(3), key=lambda i: by_hand[i]) == 1)
    normalized = [ll / len(choice) for ll, choice in zip(by_hand, ("c", "dd", "e"))]  # per character of the choice
    assert result["acc_norm"] == float(max(range(3), key=lambda i: normalized[i]) == 1)
    assert result["chance"] == pytest.approx(1 / 3) and result["examples"] == 1 and result["acc_stderr"] is None
    # greedy: every continuation token is the argmax of its position
    best_after = {c: CHARS[int(table[CHARS.index(c)].argmax())] for c in CHARS}
    greedy = [all(best_after[a] == b for a, b in zip("b" + cont[:-1], cont)) for cont in (" c", " dd", " e")]
    assert scores[1].tolist() == [float(g) for g in greedy]


def test_encoding_follows_lm_eval():
    encode = token_encoder(byte_level_tokenizer())
    # the context's trailing whitespace moves to the continuation; the pair is encoded whole and split
    ctx, cont = encode_pair(encode, "the quick brown ", "fox", prefix_id=0)
    assert ctx == encode("the quick brown") and ctx + cont == encode("the quick brown fox")
    # an empty context becomes <|endoftext|>
    assert encode_pair(encode, "", " fox", prefix_id=0) == ([0], encode(" fox"))


@pytest.mark.parametrize("overrides", [dict(), dict(n_experts=4, top_k=2, capacity_factor=0.5)], ids=["dense", "moc"])
def test_batched_scores_equal_the_models_own_loss_one_request_at_a_time(overrides):
    model = LunarisCodex(tiny_model_config(vocab_size=320, max_seq_len=16, **overrides)).eval()
    generator = torch.Generator().manual_seed(1)
    pairs = [(torch.randint(1, 320, (n_ctx,), generator=generator).tolist(),
              torch.randint(1, 320, (n_cont,), generator=generator).tolist())
             for n_ctx, n_cont in [(3, 2), (10, 4), (20, 3), (1, 1), (6, 7)]]   # (20, 3): truncated from the left
    batched = score(model, pairs, batch_size=3)
    for i, (ctx, cont) in enumerate(pairs):
        window = torch.tensor([(ctx + cont)[-17:]])
        x, y = window[:, :-1], window[:, 1:].clone()
        y[:, :-len(cont)] = -1                                   # only the continuation's tokens count
        with torch.no_grad():
            expected = -model(x, targets=y).main_loss.item() * len(cont)
        assert batched[0, i].item() == pytest.approx(expected, abs=1e-4)
        torch.testing.assert_close(batched[:, i], score(model, [(ctx, cont)], batch_size=1)[:, 0], rtol=0,
                                   atol=1e-5)  # padded in a batch or alone: the same

    # greedy flag: true for the model's own greedy continuation, false once a token differs
    ctx = pairs[1][0]
    own = model.generate(torch.tensor([ctx]), max_new_tokens=3, temperature=0.0)[0, len(ctx):].tolist()
    other = own[:2] + [(own[2] + 1) % 320]
    assert score(model, [(ctx, own), (ctx, other)], batch_size=2)[1].tolist() == [1.0, 0.0]


def test_ranks_split_the_requests_and_their_sum_is_the_whole():
    model = LunarisCodex(tiny_model_config(vocab_size=320, max_seq_len=16)).eval()
    pairs = [([1, 2, 3][:n % 3 + 1], [4 + n, 5]) for n in range(7)]
    whole = score(model, pairs, batch_size=2)
    parts = [score(model, pairs, batch_size=2, rank=r, world_size=3) for r in range(3)]
    assert torch.allclose(sum(parts), whole, atol=1e-6)
    assert all(((p[0] != 0).sum() in (2, 3)) for p in parts)       # 7 requests over 3 ranks


# ---- task files -----------------------------------------------------------------------------------------

HELLASWAG_ROWS = [
    {"ind": 4, "activity_label": "Removing ice from car", "ctx_a": "Then, the man writes over the snow covering "
     "the window of a car, and a woman wearing winter clothes smiles.", "ctx_b": "then",
     "ctx": "unused", "endings": [", the man adds wax to the windshield and cuts it.",
                                  ", a person board a ski lift, while two men supporting the head of the person.",
                                  ", the man puts on a christmas coat, knitted with netting.",
                                  ", the man continues removing the snow on his car."],
     "source_id": "activitynet~v_-1IBHYS3L-Y", "split": "val", "split_type": "indomain", "label": 3},
    {"ind": 9, "activity_label": "Home and Garden", "ctx_a": "[header] How to grow a lemon tree [title] Pick a pot.",
     "ctx_b": "[step] use a large pot", "ctx": "unused",
     "endings": ["with holes.", "made of [substeps] clay.", "that is  red.", "for the fish."],
     "source_id": "wikihow~1", "split": "val", "split_type": "zeroshot", "label": "0"},
]


def test_published_layouts_are_read_as_lm_eval_reads_them(tmp_path):
    hellaswag = load_task(parse_spec(f"hs={write_jsonl(tmp_path / 'hellaswag_val.jsonl', HELLASWAG_ROWS)}"))
    first, second = hellaswag.examples
    assert first.context == ("Removing ice from car: Then, the man writes over the snow covering the window of a car, "
                             "and a woman wearing winter clothes smiles. Then")
    assert first.choices[3] == ", the man continues removing the snow on his car." and first.label == 3
    assert second.context == "Home and Garden: How to grow a lemon tree. Pick a pot. use a large pot"
    assert second.choices == ("with holes.", "made of clay.", "that is red.", "for the fish.")
    assert hellaswag.requests()[0] == (first.context, " " + first.choices[0]) and hellaswag.chance == 0.25

    arc_hf = {"id": "q1", "question": "Which is a gas?", "choices": {"text": ["ice", "steam", "wood"],
                                                                      "label": ["A", "B", "C"]}, "answerKey": "B"}
    arc_original = {"id": "q1", "question": {"stem": "Which is a gas?", "choices": [
        {"text": "ice", "label": "1"}, {"text": "steam", "label": "2"}, {"text": "wood", "label": "3"}]},
        "answerKey": "2"}
    for row in (arc_hf, arc_original):
        arc = load_task(parse_spec(f"arc={write_jsonl(tmp_path / 'arc.jsonl', [row])}"))
        assert arc.examples == [Example("Question: Which is a gas?\nAnswer:", ("ice", "steam", "wood"), 1)]
        assert arc.chance == pytest.approx(1 / 3)

    # PIQA's original release keeps its labels in valid-labels.lst
    write_jsonl(tmp_path / "valid.jsonl", [{"goal": "Open a jar", "sol1": "Twist the lid.", "sol2": "Eat the lid."}])
    (tmp_path / "valid-labels.lst").write_text("0\n")
    piqa = load_task(parse_spec(str(tmp_path / "valid.jsonl")))
    assert piqa.name == "valid" and piqa.examples == [
        Example("Question: Open a jar\nAnswer:", ("Twist the lid.", "Eat the lid."), 0)]

    lambada = load_task(parse_spec(f"lambada={write_jsonl(tmp_path / 'l.jsonl', [{'text': 'he said hello'}])}"))
    assert lambada.kind == "cloze" and lambada.chance is None
    assert lambada.requests() == [("he said", " hello")]

    # a YAML that maps fields, with a template and choice names; limit keeps the first examples
    write_jsonl(tmp_path / "quiz.jsonl", [{"q": f"Q{i}?", "opts": ["yes", "no", "maybe"], "letters": ["A", "B", "C"],
                                            "ans": "C"} for i in range(5)])
    (tmp_path / "quiz.yaml").write_text('path: quiz.jsonl\ncontext: "Q: {q}\\nA:"\nchoices: opts\nlabel: ans\n'
                                        'label_names: letters\n')
    quiz = load_task(parse_spec(str(tmp_path / "quiz.yaml"), limit=2))
    assert quiz.name == "quiz" and quiz.examples_total == 5
    assert quiz.examples == [Example(f"Q: Q{i}?\nA:", ("yes", "no", "maybe"), 2) for i in range(2)]


def test_task_errors_are_clear(tmp_path):
    with pytest.raises(LunarisError, match="does not exist"):
        load_task(parse_spec(f"x={tmp_path / 'missing.jsonl'}"))
    with pytest.raises(LunarisError, match="match no known layout"):
        load_task(parse_spec(str(write_jsonl(tmp_path / "odd.jsonl", [{"prompt": "a", "answers": ["b"]}]))))
    with pytest.raises(LunarisError, match="row 1 .* not a valid simple example"):
        load_task(parse_spec(str(write_jsonl(tmp_path / "bad.jsonl", [{"context": "a", "choices": ["b", "c"],
                                                                       "label": 7}]))))
    with pytest.raises(LunarisError, match="more than once"):
        parse_specs(["embedded", "python_next_line=embedded"])
    with pytest.raises(LunarisError, match="unknown key"):
        parse_spec({"path": "embedded", "limt": 3})


def test_eval_tasks_config_problems_are_reported_with_the_others():
    from lunaris.config import load_config
    from lunaris.errors import ConfigError
    with pytest.raises(ConfigError) as info:
        load_config(None, {"max_steps": 0, "eval_tasks": [{"path": "embedded", "limit": 0}, 3, "embedded"]})
    message = str(info.value)
    assert "3 problems" in message and "max_steps" in message and "limit must be a positive integer" in message
    assert "task 3 is not a task" in message
    config = load_config(None, ["--eval_tasks=[embedded, {path: data/hellaswag_val.jsonl, limit: 1000}]"])  # README
    assert config.eval_tasks == ["embedded", {"path": "data/hellaswag_val.jsonl", "limit": 1000}]
    specs = parse_specs(config.eval_tasks)
    assert [(s.name, s.path, s.limit) for s in specs] == [("python_next_line", "embedded", None),
                                                          ("hellaswag_val", "data/hellaswag_val.jsonl", 1000)]
    assert load_config(None, ["--eval_tasks=embedded,hs=h.jsonl"]).eval_tasks == ["embedded,hs=h.jsonl"]


def test_a_new_layout_is_one_registry_entry(tmp_path, monkeypatch):
    from lunaris.tasks import formats
    from lunaris.tasks.types import CLOZE
    quiz = Layout("Quiz", "q, opts, ok", lambda keys: {"q", "opts", "ok"} <= keys,
                  lambda row: Example(f"Q: {row['q']}\nA:", tuple(row["opts"]), row["opts"].index(row["ok"])))
    monkeypatch.setitem(formats.LAYOUTS, "quiz", quiz)
    path = write_jsonl(tmp_path / "quiz.jsonl", [{"q": "2+2", "opts": ["4", "5"], "ok": "4"},
                                                 {"q": "1+2", "opts": ["4", "3"], "ok": "3"}])
    task = load_task(parse_spec(f"q={path}"))                              # detected from the fields
    assert task.kind == "multiple_choice" and [e.label for e in task.examples] == [0, 1]
    assert task.examples[0] == Example("Q: 2+2\nA:", ("4", "5"), 0)
    (tmp_path / "q.yaml").write_text(f"path: {path.name}\nlayout: quiz\n")  # and named by a task YAML
    assert load_task(parse_spec(str(tmp_path / "q.yaml"))).examples == task.examples
    with pytest.raises(LunarisError, match=r"Quiz \(q, opts, ok\)"):      # the error lists it with the others
        load_task(parse_spec(str(write_jsonl(tmp_path / "odd.jsonl", [{"prompt": "a"}]))))
    # a cloze layout says so, and the first matching entry wins
    monkeypatch.setitem(formats.LAYOUTS, "quiz", dataclasses.replace(quiz, kind=CLOZE))
    assert load_task(parse_spec(f"q={path}")).kind == CLOZE
    assert formats.detect_layout({"context": "", "choices": [], "label": 0, "q": 1, "opts": 1, "ok": 1}) == "simple"


def test_the_built_in_task_is_addressed_by_name_and_embedded_is_an_alias(monkeypatch):
    from lunaris.tasks import formats
    built = Task("python_next_line", "multiple_choice", [Example("a", ("b", "c"), 0)] * 3, "python_next_line")
    monkeypatch.setitem(formats.BUILTIN_TASKS, "python_next_line", lambda: dataclasses.replace(built))
    for entry in ("python_next_line", "embedded", {"name": "python_next_line"}, {"path": "python_next_line"},
                  "pnl=python_next_line", {"name": "pnl", "path": "embedded", "limit": 2}):
        spec = parse_spec(entry)
        task = load_task(spec)
        assert task.examples[0] == Example("a", ("b", "c"), 0) and task.name == spec.name, entry
    assert load_task(parse_spec({"name": "pnl", "path": "embedded", "limit": 2})).examples_total == 3
    assert len(load_task(parse_spec({"name": "pnl", "path": "embedded", "limit": 2})).examples) == 2


# ---- the embedded task ----------------------------------------------------------------------------------

def test_the_embedded_task_is_deterministic_and_held_out_from_the_demo_corpus():
    from lunaris.demo import EXCLUDE
    task = embedded_task()
    assert task.name == "python_next_line" and task.chance == 0.25 and len(task.examples) > 500
    assert all(len(set(e.choices)) == 4 and e.context.endswith("\n") for e in task.examples)
    assert [e.label for e in task.examples[:200]].count(0) < 100            # the right line's place is shuffled
    from lunaris.tasks.embedded import build_examples
    build_examples.cache_clear()
    assert embedded_task().examples == task.examples                        # rebuilt: the same examples
    assert set(HELD_OUT_GLOBS) <= set(EXCLUDE)                               # the demo never trains on them
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    files = [p for glob in HELD_OUT_GLOBS for p in stdlib.glob(glob.replace("*", "**/*.py"))]
    held_out = "".join(p.read_text(encoding="utf-8") for p in files)
    assert all(e.context.splitlines()[0] in held_out for e in task.examples[:50])   # built from those files


# ---- lunaris eval --tasks ------------------------------------------------------------------------------

def test_eval_tasks_scores_a_checkpoint_on_the_embedded_task_and_a_hellaswag_file(tmp_path, capsys):
    model = LunarisCodex(tiny_model_config(vocab_size=320, max_seq_len=128)).eval()
    run = save_run(tmp_path / "run", model)
    hellaswag = write_jsonl(tmp_path / "hellaswag_val.jsonl", HELLASWAG_ROWS * 3)
    assert main(["eval", "--checkpoint", str(run), "--tasks", "embedded", f"hellaswag={hellaswag}", "--limit", "5",
                 "--batch-size", "3", "--json", str(tmp_path / "tasks.json")]) == 0
    out = capsys.readouterr().out
    assert "| python_next_line | 5 |" in out and "| hellaswag | 5 |" in out and "0.2500" in out
    result = json.loads((tmp_path / "tasks.json").read_text())
    assert result["step"] == 5 and result["batch_size"] == 3
    embedded, hs = result["tasks"]["python_next_line"], result["tasks"]["hellaswag"]
    assert embedded["examples"] == 5 and embedded["chance"] == 0.25 and embedded["examples_total"] > 500
    assert hs["examples"] == 5 and hs["examples_total"] == 6 and hs["kind"] == "multiple_choice"

    # the same examples in the simple layout (the HellaSwag text as lm-eval cleans it) give the same numbers
    task = load_task(parse_spec(f"hs={hellaswag}", limit=5))
    simple = write_jsonl(tmp_path / "simple.jsonl", [{"context": e.context, "choices": list(e.choices),
                                                      "label": e.label} for e in task.examples])
    assert main(["eval", "--checkpoint", str(run), "--tasks", f"hs={simple}", "--json", str(tmp_path / "s.json")]) == 0
    same = json.loads((tmp_path / "s.json").read_text())["tasks"]["hs"]
    assert (same["acc"], same["acc_norm"]) == (hs["acc"], hs["acc_norm"])

    # by hand: the best choice of each example by the model's summed log-probabilities
    encode = token_encoder(byte_level_tokenizer())
    right = 0
    for example in task.examples:
        lls = []
        for choice in example.choices:
            ctx, cont = encode_pair(encode, example.context, " " + choice, 0)
            with torch.no_grad():  # contexts truncated from the left to the model's 128 positions
                logits = model(torch.tensor([(ctx + cont)[-129:-1]])).logits[0, -len(cont):]
            lls.append(logits.log_softmax(-1).gather(1, torch.tensor(cont)[:, None]).sum().item())
        right += max(range(len(lls)), key=lls.__getitem__) == example.label
    assert hs["acc"] == pytest.approx(right / 5)

    assert main(["eval", "--checkpoint", str(run), "--tasks", "embedded", "--data", str(tmp_path)]) == 2
    assert "leave out --data" in capsys.readouterr().err
    assert main(["eval", "--checkpoint", str(run), "--tasks", "nope=missing.jsonl"]) == 2
    assert "missing.jsonl does not exist" in capsys.readouterr().err
