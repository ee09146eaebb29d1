"""The built-in task `python_docstring`: given a docstring in a user message, pick the function it documents among
four, as an assistant's reply. It needs no download, and measures what fine-tuning on the example conversations
(lunaris.data.chat_example: the user gives a docstring, the assistant writes the function) teaches.

Built deterministically from the Python standard library, the same way as those conversations but from other
packages, the ones `python_next_line` uses (embedded.HELD_OUT_PACKAGES, which `lunaris demo` leaves out too), so
neither the demo's model nor the fine-tuning ever saw these functions. The functions are sorted by length and put in
groups of four of about the same length (different docstrings, different code); each function's docstring is the
context of one example, rendered as the chat template renders a prompt (`<|user|>DOCSTRING<|end|><|assistant|>`),
and the four functions of its group are the choices, in the same order for the group's four examples. A model
that ignores the docstring therefore picks the same function for all four and is right exactly once: its accuracy
is 0.25 whatever it thinks of the code, and only reading the docstring raises it. The examples of a group are
adjacent, so a `--limit` that is a multiple of 4 takes whole groups.

A model whose tokenizer has no chat tokens (a base model) reads the same text, the markers as plain characters.
"""

import functools
import random

from lunaris.data.chat_example import docstring_functions
from lunaris.data.chat_template import ASSISTANT, END, USER
from lunaris.tasks.embedded import HELD_OUT_PACKAGES, stdlib_task
from lunaris.tasks.types import Example, Task

NAME = "python_docstring"
GROUP = 4
SEED = 0


def groups(functions: list) -> list:
    """Groups of GROUP (docstring, code) of about the same code length, their docstrings and codes distinct (a
    function that would repeat one waits for the next group)."""
    found, group, waiting = [], [], []
    for function in sorted(functions, key=lambda f: len(f[1])):
        waiting.append(function)
        for candidate in list(waiting):
            if all(candidate[0] != other[0] and candidate[1] != other[1] for other in group):
                group.append(candidate)
                waiting.remove(candidate)
                if len(group) == GROUP:
                    found.append(group)
                    group = []
    return found


@functools.lru_cache(maxsize=4)
def build_examples(stdlib: str) -> tuple:
    rng = random.Random(SEED)
    functions = [(docstring, code) for docstring, code, _ in docstring_functions(stdlib, HELD_OUT_PACKAGES)]
    rng.shuffle(functions)  # ties in length in a seeded order
    found = groups(functions)
    rng.shuffle(found)      # a --limit takes groups from every length and package
    examples = []
    for group in found:
        rng.shuffle(group)
        choices = tuple(code for _, code in group)
        examples += [Example(f"{USER}{text}{END}{ASSISTANT}", choices, k) for k, (text, _) in enumerate(group)]
    return tuple(examples)


def docstring_task(stdlib=None) -> Task:
    """The task (all its examples); `stdlib` defaults to this interpreter's standard library."""
    return stdlib_task(NAME, build_examples, stdlib)
