"""A Ctrl-C while the command line starts: one line, as at any other moment, not a traceback.

``minilora ...`` spends its first half second importing NumPy and the engine before
``cli.main`` runs, and it is ``cli.main`` that says an interrupt in one line ("minilora train:
interrupted", exit status 130). A SIGINT in that first half second would print the traceback of
whatever import it cut. So when this process is the command line (the console script, or
``python -m minilora``), the package's first act is :func:`guard`: SIGINT goes to
:func:`_while_starting`, which says so in one line and exits with 130; ``cli.main`` calls
:func:`done` just before it runs the command, giving SIGINT back to Python's handler, and
:func:`finishing` as the command ends, after which a Ctrl-C (a user pressing it again and again)
exits at once without a traceback. Imported as a library (a notebook, a test, a script of one's
own), nothing changes.
"""

from __future__ import annotations

import os
import signal
import sys
from typing import Any

EXIT_INTERRUPTED = 130  # 128 + SIGINT, what a shell reports for a command Ctrl-C stopped
_SCRIPT_NAMES = ("minilora", "minilora.exe", "minilora-script.py")  # the console script's file
_TAKES_VALUE = ("-W", "-X", "-Q")  # interpreter options whose value is the next word


def is_the_command() -> bool:
    """True when this process is minilora's command line: the interpreter was started as
    ``python [options] -m minilora ...``, or ``__main__`` is the console script."""
    argv = list(getattr(sys, "orig_argv", None) or [])  # Python 3.10+: as the process began
    words = iter(argv[1:])
    for word in words:
        if word == "-m":
            return next(words, None) == "minilora"
        if word.startswith("-m"):  # -mminilora
            return word[2:] == "minilora"
        if word in _TAKES_VALUE:
            next(words, None)
        elif not word.startswith("-") or word in ("-c", "-"):
            break  # a script, -c code or stdin: not -m
    main = sys.modules.get("__main__")
    return os.path.basename(getattr(main, "__file__", None) or "") in _SCRIPT_NAMES


def _while_starting(signum: int, frame: Any) -> None:
    """SIGINT before the command runs: one line on stderr, exit status 130."""
    try:
        sys.stderr.write("minilora: interrupted while starting\n")
        sys.stderr.flush()
    except Exception:  # noqa: BLE001 -- no stderr to speak to, or a write it cut (reentrant)
        pass
    raise SystemExit(EXIT_INTERRUPTED)


_guarded = False  # guard() took SIGINT: this process is the command line


def _at_exit(signum: int, frame: Any) -> None:
    """SIGINT once the command is over: flush what was printed, exit with 130 at once."""
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except Exception:  # noqa: BLE001 -- a flush re-entered from a write it cut is a RuntimeError
            pass
    os._exit(EXIT_INTERRUPTED)


def guard() -> bool:
    """Take SIGINT with :func:`_while_starting` when this process is the command line and SIGINT
    is still Python's own (a caller that set its own keeps it); True if it was taken."""
    try:
        if not is_the_command() or signal.getsignal(signal.SIGINT) is not \
                signal.default_int_handler:
            return False
        signal.signal(signal.SIGINT, _while_starting)
    except (ValueError, OSError):  # not the main thread, or no signals here
        return False
    global _guarded
    _guarded = True
    return True


def done() -> None:
    """The command starts: SIGINT is Python's own again (KeyboardInterrupt), if :func:`guard`
    took it."""
    try:
        if signal.getsignal(signal.SIGINT) is _while_starting:
            signal.signal(signal.SIGINT, signal.default_int_handler)
    except (ValueError, OSError):
        pass


def finishing() -> None:
    """The command is over (done, refused or interrupted): a Ctrl-C from here on, while the
    process winds down (worker threads ending the piece they were on, Python's own exit), ends it
    at once with 130 and no word, where Python would print a KeyboardInterrupt traceback from
    wherever it struck. Only in the command line's process (:func:`guard` took SIGINT); every save
    is whole or untouched by then."""
    if not _guarded:
        return
    try:
        signal.signal(signal.SIGINT, _at_exit)
    except (ValueError, OSError):
        pass


__all__ = ["EXIT_INTERRUPTED", "is_the_command", "guard", "done", "finishing"]
