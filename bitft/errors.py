"""One error type for everything a user can get wrong, and one way to report it.

Every problem bitft can name (a bad path, a bad config key, unusable data, a non-finite loss) is
a `BitftError` whose message is one line that names the problem and the fix (a stop on a signal,
`Preempted`, is reported the same way). `run_main` is the
one wrapper the CLI and every recipe use: it turns such an error into that line on stderr and an
exit code (the error's own, or the program's default), and lets anything else through as a bug;
in a launched process it destroys the process group on the way out.
"""

from __future__ import annotations

import os
import sys


class BitftError(Exception):
    """A problem with the user's input, said in one line that names the fix."""

    exit_code: int | None = None  # None: the program's default (1 for `bitft`, 2 for the recipes)
    label = "error: "              # what `run_main` prints between the program's name and the message


class ConfigError(BitftError):
    """A problem with a run's configuration (YAML keys, flags, combinations)."""


class DataError(BitftError):
    """A problem with the data: files, fields, rows, chat templates."""


class NonFiniteLossError(BitftError):
    """A NaN/inf training loss; the state of the last good step has been saved."""

    exit_code = 3
    label = ""  # "sft: loss is nan at optimizer step 3, ...": a failure of the run, not of the input

    def __init__(self, step: int, loss: float, message: str | None = None):
        self.step, self.loss = step, loss
        super().__init__(message or f"loss is {loss} at optimizer step {step}: training stopped")


class Preempted(BaseException):
    """The run stopped on a signal (bitft.train.preempt), its work saved: exit 75, "run me again".

    A BaseException, like KeyboardInterrupt: raised from a signal handler while a library runs, no
    `except Exception` of that library swallows it."""

    exit_code = 75  # sysexits EX_TEMPFAIL
    label = ""
    restore = staticmethod(lambda: None)  # gives the signal handlers back; the stop's handlers ignore until then


def run_main(main, prog: str, argv=None, exit_code: int = 1) -> int:
    """main(argv), with a BitftError turned into one line on stderr (`PROG: error: MESSAGE`) and its exit code.

    BITFT_DEBUG=1 re-raises instead, for the traceback."""
    try:
        main(argv)
    except (BitftError, Preempted) as e:
        if os.environ.get("BITFT_DEBUG"):
            raise
        print(f"{prog}: {e.label}{e}", file=sys.stderr, flush=True)
        if isinstance(e, Preempted):
            e.restore()
        return e.exit_code if e.exit_code is not None else exit_code
    finally:
        _close_process_group()
    return 0


def _close_process_group() -> None:
    """A launched process leaves with its process group destroyed: exiting with gloo's threads still alive
    aborts it (`terminate called without an active exception`, SIGABRT) after a run that had succeeded."""
    dist = sys.modules.get("torch.distributed")
    if dist is not None and dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
