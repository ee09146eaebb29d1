"""User-facing errors.

Every problem a user can cause (a bad config, a missing file, a corrupt shard) is raised as a
`LunarisError` whose message is one paragraph naming the file, key or value and what to do. The CLI
prints it without a traceback and exits with status 2 (`exit_status`).
"""

import difflib
import os
import sys


class LunarisError(Exception):
    """A problem with the user's input; the message says what and how to fix it."""


class ConfigError(LunarisError, ValueError):
    """One or more invalid configuration values (all of them, in one message).

    `problems` holds the sentences one by one (the message alone when it was raised with none), so code that
    gathers problems from several configs (the sweep) never parses the message.
    """

    def __init__(self, message: str, problems=None):
        super().__init__(message)
        self.problems = list(problems) if problems else [message]

    def __reduce__(self):  # picklable with its problems (an exception pickles only its args by default)
        return type(self), (str(self), self.problems)


class DataError(LunarisError, ValueError):
    """Missing, corrupt or incompatible data (shards, manifests, sources)."""


class CheckpointError(LunarisError, ValueError):
    """A checkpoint that is missing, unreadable, or made for another configuration."""


class DiskError(LunarisError, OSError):
    """A file could not be written because its disk is full, over quota or read-only (lunaris.fileio says which,
    what is still safe on disk, and what to do)."""


def suggest(word, candidates) -> str:
    """' (did you mean 'x'?)' for the closest of `candidates` to `word`, or ''."""
    if not isinstance(word, str):
        return ""
    match = difflib.get_close_matches(word, list(candidates), n=1, cutoff=0.6)
    return f" (did you mean '{match[0]}'?)" if match else ""


def exit_status(run) -> int:
    """Call `run()` as a command: its status (None is 0); a LunarisError prints `error: MESSAGE` on stderr and
    gives 2, Ctrl-C prints `interrupted` and gives 130, a closed output pipe (`lunaris plan ... | head`) ends quietly
    with 1. Never a traceback for the user's mistakes."""
    try:
        return run() or 0
    except BrokenPipeError:  # the reader went away: nothing left to say, and Python's flush at exit must not fail
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 1
    except LunarisError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
