"""The evaluation command lines' errors as users read them: a ValueError (a bad argument, a
folder that holds no run, a run of another kind) is one line `error: ...` and exit code 2, not a
traceback.

    if __name__ == "__main__":
        sys.exit(cli.run(main))
"""
from __future__ import annotations

import sys
from typing import Any, Callable, Optional, Sequence


def run(main: Callable[[Optional[Sequence[str]]], Any],
        argv: Optional[Sequence[str]] = None) -> int:
    """main(argv)'s exit code (0 when it returns something else, e.g. its numbers); 2 with one
    error line when it raises a ValueError."""
    try:
        out = main(argv)
    except ValueError as e:
        print(f"error: {' '.join(str(e).split())}", file=sys.stderr)
        return 2
    return out if isinstance(out, int) else 0
