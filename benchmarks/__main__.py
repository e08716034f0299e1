"""Run one benchmark by name: `mnemax-bench NAME [its flags]` (the console script `pip install` puts
on the PATH; `python -m benchmarks NAME ...` from a checkout). `mnemax-bench --list` names them;
`mnemax-bench NAME --help` shows a benchmark's flags. Each writes its JSON through
`benchmarks.harness.write_result`.
"""
from __future__ import annotations

import importlib
import sys
from typing import Optional, Sequence

BENCHMARKS = ("trainer", "landmark_attention", "ssm", "dkvb", "mac", "hf_load", "aot_compile")


def main(argv: Optional[Sequence[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help", "--list"):
        for name in BENCHMARKS:
            doc = importlib.import_module(f"benchmarks.{name}").__doc__ or ""
            print(f"{name}\t{doc.strip().splitlines()[0] if doc.strip() else ''}")
        return 0 if argv else 2
    name, rest = argv[0], argv[1:]
    if name not in BENCHMARKS:
        print(f"error: benchmark={name!r} is unknown; allowed: {list(BENCHMARKS)}",
              file=sys.stderr)
        return 2
    result = importlib.import_module(f"benchmarks.{name}").main(rest)
    return result if isinstance(result, int) else 0


if __name__ == "__main__":
    sys.exit(main())
