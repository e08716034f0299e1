"""Regenerate the papers' figures: `python -m eval.figures [--only NAME] [--size S] [--seed S] [--out DIR]`.

Each family registers its figures here with `@register("name")`. A figure function has the
signature `fn(*, size: str, seed: int, out: pathlib.Path, **options) -> dict` and

- trains what it needs (or reuses runs it finds under `out`), evaluates, and
- writes `out/NAME.png` and `out/NAME.csv` itself (see `write_csv`), and
- returns the numbers as a JSON-serialisable dict (the keys its issue names); this module writes
  them to `out/NAME.json`.

Sizes: `quick` is what `make demo` runs (every figure together in about 15 minutes on 2 CPU cores),
`cpu` what `make figures` runs (about an hour), `paper` the papers' sizes for accelerators.
"""
from __future__ import annotations

import argparse
import csv
import importlib
import json
import pathlib
import sys
import time
from typing import Callable, Iterable, Sequence

SIZES = ("quick", "cpu", "paper")

# Modules that register figures; imported lazily so one broken family does not hide the others.
FIGURE_MODULES = (
    "eval.lm_mqar",
    "eval.passkey",
    "eval.landmark_perplexity",
    "eval.phonebook",
    "eval.birdie_recall",
    "eval.class_incremental",
    "eval.streaming_qa",
)

_REGISTRY: dict[str, Callable[..., dict]] = {}


def register(name: str):
    """Decorator: adds a figure function to the registry under `name`."""

    def wrap(fn):
        if name in _REGISTRY and _REGISTRY[name] is not fn:
            raise ValueError(f"figure {name!r} is registered twice")
        _REGISTRY[name] = fn
        return fn

    return wrap


def load_all() -> dict[str, Callable[..., dict]]:
    for mod in FIGURE_MODULES:
        try:
            importlib.import_module(mod)
        except ModuleNotFoundError as e:
            # A family whose evaluator does not exist yet registers nothing.
            if e.name != mod:
                raise
    return dict(_REGISTRY)


def write_csv(path: pathlib.Path, header: Sequence[str], rows: Iterable[Sequence]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(header)
        for r in rows:
            w.writerow(r)


def run_figure(name: str, *, size: str = "quick", seed: int = 0, out: str | pathlib.Path = "figures",
               **options) -> dict:
    """Runs one registered figure and writes NAME.json; returns its numbers."""
    figures = load_all()
    if name not in figures:
        raise ValueError(f"figure={name!r} is unknown; allowed: {sorted(figures)}")
    if size not in SIZES:
        raise ValueError(f"size={size!r} is not allowed; use one of {SIZES}")
    out = pathlib.Path(out)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    numbers = figures[name](size=size, seed=seed, out=out, **options)
    (out / f"{name}.json").write_text(json.dumps(numbers, indent=2, sort_keys=True) + "\n")
    print(json.dumps({"figure": name, "size": size, "seed": seed,
                      "seconds": round(time.time() - t0, 1)}), flush=True)
    return numbers


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--only", default=None, help="comma-separated figure names (default: all)")
    p.add_argument("--size", default="quick", choices=SIZES)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="figures")
    p.add_argument("--class_order", default=None,
                   help="comma-separated class permutation (figures that split classes into tasks)")
    args = p.parse_args(argv)
    figures = load_all()
    names = args.only.split(",") if args.only else sorted(figures)
    for n in names:
        if n not in figures:
            p.error(f"--only: unknown figure {n!r}; allowed: {sorted(figures)}")
    options = {}
    if args.class_order is not None:
        options["class_order"] = [int(c) for c in args.class_order.split(",")]
    for n in names:
        opts = options if n.startswith("dkvb_") else {}
        run_figure(n, size=args.size, seed=args.seed, out=args.out, **opts)
    return 0


if __name__ == "__main__":
    # Run through the importable module, so the figures register into the registry it reads
    # (under `python -m`, this file is `__main__`, a second copy with an empty registry).
    from eval import figures as _figures
    sys.exit(_figures.main())
