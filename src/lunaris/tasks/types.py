"""What a downstream task is: examples (a context and its choices) and the task that holds them.

A task is a list of examples, each a context and its choices, scored by log-likelihood (see scoring.py):

* multiple choice: the model picks the choice whose continuation `target_delimiter + choice` it finds most
  likely after the context (`acc`), or most likely per character of the choice (`acc_norm`);
* cloze: one target (LAMBADA's last word); right when greedy decoding after the context produces it exactly.
"""

from dataclasses import dataclass
from typing import Optional

MULTIPLE_CHOICE, CLOZE = "multiple_choice", "cloze"


@dataclass(frozen=True)
class Example:
    context: str
    choices: tuple        # the candidate continuations (one, the target, for a cloze task)
    label: int = 0        # index of the right choice


@dataclass
class Task:
    name: str
    kind: str                               # MULTIPLE_CHOICE or CLOZE
    examples: list
    source: str                             # the file it was read from, or the built-in task's name
    target_delimiter: str = " "             # between the context and every choice
    examples_total: int = 0                 # in the file, before `limit`

    @property
    def chance(self) -> Optional[float]:
        """Expected accuracy of a uniform random pick (None for cloze: there is nothing to pick from)."""
        if self.kind != MULTIPLE_CHOICE or not self.examples:
            return None
        return sum(1.0 / len(e.choices) for e in self.examples) / len(self.examples)

    def requests(self) -> list:
        """(context, continuation) of every choice of every example, in order."""
        return [(e.context, self.target_delimiter + choice) for e in self.examples for choice in e.choices]
