"""Regenerate the papers' figures, their numbers and the numbers' provenance.

    mnemax-figures [--only NAME,...] [--size quick|cpu|paper] [--seed S] [--out DIR]
                   [--results DIR]
    mnemax-figures --list        # the registered figures, one a line

(`mnemax-figures` is the console script `pip install` puts on the PATH; `python -m eval.figures`
is the same from a checkout.)

Each family registers its figures here with `@register("name", settings=fn)`. A figure function
has the signature `fn(*, size: str, seed: int, out: pathlib.Path, **options) -> dict` and

- trains what it needs (or reuses runs it finds under `out`), evaluates, and
- writes `out/NAME.png` and `out/NAME.csv` itself (see `write_csv`), and
- returns the numbers as a JSON-serialisable dict (the keys its issue names); this module adds a
  "provenance" object (see `provenance`) and writes them to `out/NAME.json` and, with
  `--results DIR`, to `DIR/NAME-SIZE-seedS.json` (the committed evidence `eval.report` reads).

`settings(size) -> dict` returns the figure's recipe at that size as JSON-able data (the trainer
config(s) it builds, or its module's SIZES entry); its hash is the provenance's `config_hash`, so
two result files with one hash came from one recipe.

Sizes: `quick` is what `make demo` runs (every figure but those registered with in_demo=False;
its measured time is in the README), `cpu` what `make figures` runs (each result file's
provenance holds its seconds), `paper` the papers' sizes for accelerators.
"""
from __future__ import annotations

import argparse
import csv
import dataclasses
import hashlib
import importlib
import importlib.metadata
import json
import pathlib
import platform
import subprocess
import sys
import time
from typing import Any, Callable, Iterable, Sequence

from tqdm.auto import tqdm

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
    "eval.memory_bench",
)

# Packages whose versions a result file records.
VERSION_PACKAGES = ("jax", "jaxlib", "flax", "optax", "orbax-checkpoint", "numpy")
REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]

_REGISTRY: dict[str, Callable[..., dict]] = {}
_NOT_IN_DEMO: set[str] = set()   # figures `make demo` skips (register's in_demo)
_SETTINGS: dict[str, Callable[[str], Any]] = {}


def register(name: str, *, settings: Callable[[str], Any] | None = None, in_demo: bool = True):
    """Decorator: adds a figure function to the registry under `name`.

    `settings(size)` returns the figure's recipe at `size` as JSON-able data (dicts, lists,
    tuples, numbers, strings, None, dataclasses); `config_hash` hashes it. Without it the
    provenance's config_hash is null. `in_demo=False`: `--size quick` without `--only` (what
    `make demo` runs) skips the figure, for one whose effect cannot show in a demo's minutes."""

    def wrap(fn):
        if name in _REGISTRY and _REGISTRY[name] is not fn:
            raise ValueError(f"figure {name!r} is registered twice")
        if settings is not None and not callable(settings):
            raise ValueError(f"settings={settings!r} for figure {name!r} must be callable(size)")
        _REGISTRY[name] = fn
        if not in_demo:
            _NOT_IN_DEMO.add(name)
        if settings is not None:
            _SETTINGS[name] = settings
        return fn

    return wrap


def _jsonable(x: Any, where: str = "settings") -> Any:
    """x as plain JSON data: dataclasses → dicts, tuples → lists, numpy scalars → numbers."""
    if dataclasses.is_dataclass(x) and not isinstance(x, type):
        x = dataclasses.asdict(x)
    if hasattr(x, "to_dict") and callable(x.to_dict):      # ml_collections.ConfigDict
        x = x.to_dict()
    if isinstance(x, dict):
        return {str(k): _jsonable(v, f"{where}.{k}") for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_jsonable(v, f"{where}[{i}]") for i, v in enumerate(x)]
    if x is None or isinstance(x, (bool, int, float, str)):
        return x
    if hasattr(x, "item") and getattr(x, "shape", None) == ():     # numpy / jax scalar
        return x.item()
    raise ValueError(f"{where}={x!r} is not JSON-able; allowed: dicts, lists, tuples, numbers, "
                     "strings, None, dataclasses")


def config_hash(recipe: Any) -> str:
    """12 hex digits of sha256 over the canonical JSON (sorted keys, no spaces) of `recipe`."""
    canon = json.dumps(_jsonable(recipe), sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(canon.encode()).hexdigest()[:12]


def git_state(root: pathlib.Path = REPO_ROOT) -> dict:
    """{"commit": HEAD's hash, "dirty": bool}: dirty when a tracked file outside results/ differs
    from HEAD (results/ holds what figures write, so writing one does not dirty the next).
    Both null outside a git checkout (an installed package)."""
    def git(*args):
        return subprocess.run(["git", *args], cwd=root, capture_output=True, text=True,
                              timeout=60)
    try:
        head = git("rev-parse", "HEAD")
        if head.returncode != 0:
            return {"commit": None, "dirty": None}
        status = git("status", "--porcelain", "--untracked-files=no", "--", ".",
                     ":(exclude)results")
    except (OSError, subprocess.TimeoutExpired):
        return {"commit": None, "dirty": None}
    return {"commit": head.stdout.strip(), "dirty": bool(status.stdout.strip())}


def device_info() -> dict:
    """The default backend: platform, device kind (of device 0) and device count."""
    import jax
    d = jax.devices()[0]
    return {"platform": d.platform, "device_kind": d.device_kind,
            "device_count": jax.device_count()}


def versions() -> dict:
    """Python's version and those of VERSION_PACKAGES that are installed."""
    out = {"python": platform.python_version()}
    for pkg in VERSION_PACKAGES:
        try:
            out[pkg] = importlib.metadata.version(pkg)
        except importlib.metadata.PackageNotFoundError:
            out[pkg] = None
    return out


def provenance(name: str, *, size: str, seed: int, seconds: float, git: dict | None = None,
               options: dict | None = None) -> dict:
    """What a figure's JSON records about how its numbers were made: git commit (+ dirty), the
    recipe's config_hash (null when the figure registers no settings), size, seed, wall seconds,
    device, versions, and the figure options (e.g. class_order) when any were given."""
    git = git_state() if git is None else git
    settings = _SETTINGS.get(name)
    out = {"figure": name, "git_commit": git["commit"], "dirty": git["dirty"],
           "config_hash": config_hash(settings(size)) if settings else None,
           "size": size, "seed": seed, "seconds": round(float(seconds), 1),
           "device": device_info(), "versions": versions()}
    if options:
        out["options"] = _jsonable(options, "options")
    return out


def result_path(results: str | pathlib.Path, name: str, size: str, seed: int) -> pathlib.Path:
    """Where `--results DIR` keeps one run's numbers: DIR/NAME-SIZE-seedS.json."""
    return pathlib.Path(results) / f"{name}-{size}-seed{seed}.json"


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


def run_figure(name: str, *, size: str = "quick", seed: int = 0,
               out: str | pathlib.Path = "figures", results: str | pathlib.Path | None = None, **options) -> dict:
    """Runs one registered figure and writes OUT/NAME.json (and, if `results` is given,
    RESULTS/NAME-SIZE-seedS.json): its numbers plus a "provenance" object; returns that dict."""
    figures = load_all()
    if name not in figures:
        raise ValueError(f"figure={name!r} is unknown; allowed: {sorted(figures)}")
    if size not in SIZES:
        raise ValueError(f"size={size!r} is not allowed; use one of {SIZES}")
    if name in _SETTINGS:
        config_hash(_SETTINGS[name](size))   # a recipe that cannot be hashed fails before training
    out = pathlib.Path(out)
    out.mkdir(parents=True, exist_ok=True)
    git = git_state()                           # the code as it was when the run started
    t0 = time.time()
    numbers = figures[name](size=size, seed=seed, out=out, **options)
    seconds = time.time() - t0
    if "provenance" in numbers:
        raise ValueError(f"figure {name!r} returned a 'provenance' key; that key is run_figure's")
    doc = {**numbers, "provenance": provenance(name, size=size, seed=seed, seconds=seconds,
                                               git=git, options=options)}
    text = json.dumps(doc, indent=2, sort_keys=True) + "\n"
    (out / f"{name}.json").write_text(text)
    if results is not None:
        path = result_path(results, name, size, seed)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    print(json.dumps({"figure": name, "size": size, "seed": seed, "seconds": round(seconds, 1)}),
          flush=True)
    return doc


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--only", default=None, help="comma-separated figure names (default: all)")
    p.add_argument("--size", default="quick", choices=SIZES)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="figures")
    p.add_argument("--results", default=None,
                   help="also write DIR/NAME-SIZE-seedS.json (make figures: results/figures)")
    p.add_argument("--class_order", default=None,
                   help="comma-separated class permutation (figures that split classes into tasks)")
    p.add_argument("--tokenizer", default=None,
                   help="birdie_phonebook: the tokenizer its rows are counted in (paper: required)")
    p.add_argument("--tfds_name", default="",
                   help="birdie_phonebook at paper size: the prepared pre-training corpus")
    p.add_argument("--list", action="store_true", help="list the registered figures and exit")
    args = p.parse_args(argv)
    figures = load_all()
    if args.list:
        for n in sorted(figures):
            print(f"{n}\t{'in the demo' if n not in _NOT_IN_DEMO else 'not in the demo'}")
        return 0
    names = args.only.split(",") if args.only else sorted(figures)
    for n in names:
        if n not in figures:
            p.error(f"--only: unknown figure {n!r}; allowed: {sorted(figures)}")
    if args.only is None and args.size == "quick":
        skipped = sorted(set(names) & _NOT_IN_DEMO)
        names = [n for n in names if n not in _NOT_IN_DEMO]
        if skipped:
            print(json.dumps({"not_in_demo": skipped,
                              "run_with": "--only NAME --size quick"}), flush=True)
    options = {}
    if args.class_order is not None:
        options["class_order"] = [int(c) for c in args.class_order.split(",")]
    phonebook_options = {k: v for k, v in (("tokenizer", args.tokenizer),
                                           ("tfds_name", args.tfds_name)) if v}
    bar = tqdm(names, desc="figures", unit="figure", dynamic_ncols=True)
    for n in bar:
        bar.set_postfix_str(n)
        opts = (options if n.startswith("dkvb_") else
                phonebook_options if n == "birdie_phonebook" else {})
        run_figure(n, size=args.size, seed=args.seed, out=args.out, results=args.results,
                   **opts)
    return 0


def cli() -> None:
    """The `mnemax-figures` console script (a ValueError: one `error:` line, exit code 2)."""
    from eval import cli as cli_lib
    sys.exit(cli_lib.run(main))


if __name__ == "__main__":
    # Run through the importable module, so the figures register into the registry it reads
    # (under `python -m`, this file is `__main__`, a second copy with an empty registry).
    from eval import cli as _cli, figures as _figures
    sys.exit(_cli.run(_figures.main))
