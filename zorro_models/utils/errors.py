"""How zorro's programs report errors: one line in our words, the traceback only on request.

The ``zorro`` command, ``python -m zorro_models.train`` and every rank of a DDP run print an error as
``PROG: error: LINE``; ``--debug`` (or ``ZORRO_DEBUG=1``) lets it propagate with its traceback instead. This module sits
below the commands and the training code so that both can use it.
"""

from __future__ import annotations

import os
import sys

__all__ = ["RankFailure", "error_line", "run_reporting_errors"]


class RankFailure(RuntimeError):
    """Raised by the ranks that did not fail when another rank did: the message names that rank, what it was doing,
    and its error as the one line it prints itself."""


def run_reporting_errors(fn, debug: bool = False, prog: str = "zorro") -> int:
    """``fn()``'s exit status; an exception prints one line, ``{prog}: error: ...``, and returns 1 (an interrupt: 130),
    unless ``debug`` or ``ZORRO_DEBUG=1``, which let it propagate with its traceback."""
    debug = debug or os.environ.get("ZORRO_DEBUG", "") not in ("", "0")
    try:
        return fn()
    except KeyboardInterrupt:
        if debug:
            raise
        _say_line(f"{prog}: interrupted")
        return 130
    except Exception as e:  # noqa: BLE001 - every error reaches the user as one line; --debug keeps the traceback
        if debug:
            raise
        _say_line(f"{prog}: error: {error_line(e)}")
        return 1


def _say_line(line: str) -> None:
    """``line`` and its newline to stderr in one write: the ranks of a DDP run share one stream, and ``print``'s two
    writes (the text, then the newline) let another rank's line land between them — unbuffered, as under torchrun,
    the ranks' lines came out glued into one."""
    sys.stderr.write(line + "\n")
    sys.stderr.flush()


def error_line(e: BaseException) -> str:
    """``e`` as one line: our errors (ValueError, TypeError, a missing file; another rank's error, which holds its
    line) speak for themselves; anything else is unexpected, so its type is named and the way to the traceback
    given."""
    text = " ".join(str(e).split()) or type(e).__name__
    if isinstance(e, (ValueError, TypeError, KeyError, OSError, RankFailure)):
        return text
    return f"{type(e).__name__}: {text} (run with --debug for the traceback)"
