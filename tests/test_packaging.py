"""pyproject.toml and constraints.txt agree (issue 24): the versions pyproject allows start at
the versions the tests ran with.

The rule, for every direct dependency (`[project].dependencies` and the `test` extra):
- it is pinned in constraints.txt (`name==version`, names compared in canonical form);
- the pinned version satisfies pyproject's specifier;
- the specifier has exactly one lower bound, `>=V`, and V equals the pinned version.
Equality, not "V ≤ pin": constraints.txt holds the one version of each package that the suite
passed with, so a lower bound below its pin admits versions nobody tested — the issue's bug —
whether someone lowered the bound or moved the pin (`make lock`) without raising it. mnemax
itself is never pinned. Pure parsing: no network, no pip.
"""
import copy
import pathlib
import re
import tomllib

import pytest
from packaging.requirements import InvalidRequirement, Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

REPO = pathlib.Path(__file__).resolve().parents[1]
PYPROJECT = tomllib.loads((REPO / "pyproject.toml").read_text())
CONSTRAINTS = (REPO / "constraints.txt").read_text()


def read_pins(text: str) -> dict[str, Version]:
    """constraints.txt's `name==version` lines by canonical name; comments and blanks skipped."""
    pins = {}
    for n, raw in enumerate(text.splitlines(), 1):
        line = raw.split("#", 1)[0].strip()
        if not line:
            continue
        try:
            req = Requirement(line)
        except InvalidRequirement as e:
            raise ValueError(f"constraints line {n}: {line!r} is not a requirement ({e})") from None
        spec = list(req.specifier)
        if (len(spec) != 1 or spec[0].operator != "==" or spec[0].version.endswith("*")
                or req.extras or req.url or req.marker):
            raise ValueError(f"constraints line {n}: {line!r} is not an exact pin name==version")
        name = canonicalize_name(req.name)
        if name in pins:
            raise ValueError(f"constraints line {n}: {req.name} is pinned twice")
        pins[name] = Version(spec[0].version)
    return pins


def direct_requirements(pyproject: dict) -> list[Requirement]:
    """`[project].dependencies` and the `test` extra."""
    project = pyproject["project"]
    return [Requirement(r) for r in
            project["dependencies"] + project["optional-dependencies"]["test"]]


def disagreements(pyproject: dict, pins: dict[str, Version]) -> list[str]:
    """One line per breach of the module docstring's rule; [] when the two files agree."""
    problems = []
    if canonicalize_name(pyproject["project"]["name"]) in pins:
        problems.append(f"{pyproject['project']['name']} itself is pinned in constraints.txt")
    for req in direct_requirements(pyproject):
        pinned = pins.get(canonicalize_name(req.name))
        if pinned is None:
            problems.append(f"{req}: {req.name} is not pinned in constraints.txt")
            continue
        if not req.specifier.contains(pinned, prereleases=True):
            problems.append(f"{req}: the pinned {req.name}=={pinned} does not satisfy it")
        lower = [Version(s.version) for s in req.specifier if s.operator == ">="]
        if lower != [pinned]:
            problems.append(f"{req}: its lower bound must be >={pinned}, the pinned version")
    return problems


def with_requirement(name: str, new: str | None) -> dict:
    """PYPROJECT with the direct dependency `name` replaced by `new` (None: removed)."""
    pyproject = copy.deepcopy(PYPROJECT)
    project = pyproject["project"]
    for deps in (project["dependencies"], project["optional-dependencies"]["test"]):
        for i, r in enumerate(deps):
            if canonicalize_name(Requirement(r).name) == canonicalize_name(name):
                deps[i:i + 1] = [] if new is None else [new]
                return pyproject
    raise AssertionError(f"{name} is not a direct dependency")


def test_pyproject_and_constraints_agree():
    problems = disagreements(PYPROJECT, read_pins(CONSTRAINTS))
    assert not problems, ("pyproject.toml and constraints.txt disagree (make lock, then set each "
                          "lower bound to its pin):\n" + "\n".join(problems))


def test_the_tested_versions_are_the_bounds():
    """The versions issue 24 names as tested are the ones pinned and required."""
    pins = read_pins(CONSTRAINTS)
    assert pins["jax"] == pins["jaxlib"] and pins["jax"].release[:2] == (0, 12)
    assert pins["flax"].release[:2] == (0, 12)
    assert pins["grain"] == Version("0.2.18")
    assert pins["tensorflow-datasets"] == Version("4.9.10")
    assert PYPROJECT["project"]["requires-python"] == ">=3.12"   # what jax 0.12 requires


@pytest.mark.parametrize("name,new,expected", [
    ("jax", "jax>=0.13", "does not satisfy it"),                  # bumped without the lock
    ("jax", "jax>=0.7.0", "lower bound must be >=0.12.0.1"),     # an untested lower bound
    ("grain", "grain", "lower bound must be >=0.2.18"),           # no lower bound at all
    ("grain", "grain>=0.2.18,<0.2.18", "does not satisfy it"),    # an upper bound below the pin
    ("pytest", "pytest>=8.0", "lower bound must be >=9.2.0"),     # the test extra counts too
    ("numpy", "numpy>=2.5.5,>=2.0", "lower bound must be >=2.5.5"),  # two lower bounds
])
def test_a_changed_bound_is_caught(name, new, expected):
    problems = disagreements(with_requirement(name, new), read_pins(CONSTRAINTS))
    assert problems and all(p.startswith(name) for p in problems), problems
    assert any(expected in p for p in problems), problems


def test_a_dependency_missing_from_the_lock_is_caught():
    pins = read_pins(CONSTRAINTS)
    del pins["tensorflow-datasets"]
    problems = disagreements(PYPROJECT, pins)
    assert problems == ["tensorflow-datasets>=4.9.10: tensorflow-datasets is not pinned in "
                        "constraints.txt"]


def test_a_moved_pin_and_a_pinned_mnemax_are_caught():
    pins = read_pins(CONSTRAINTS)
    pins["array-record"] = Version("0.9.0")        # `make lock` moved it, the bound stayed
    pins["mnemax"] = Version("0.1.0")
    problems = disagreements(PYPROJECT, pins)
    assert len(problems) == 2, problems
    assert "mnemax itself is pinned" in problems[0]
    assert "array-record>=0.8.6: its lower bound must be >=0.9.0" in problems[1]


def test_names_compare_in_canonical_form():
    # pip freeze writes array_record and ml_collections; pyproject says array-record, ml-collections
    assert {"array-record", "ml-collections"} <= set(read_pins("array_record==0.8.6\n"
                                                                "ML.Collections==1.1.0\n"))


@pytest.mark.parametrize("text,message", [
    ("jax>=0.12\n", "line 1: 'jax>=0.12' is not an exact pin"),
    ("# header\njax==0.12.*\n", "line 2: 'jax==0.12.*' is not an exact pin"),
    ("jax==0.12.0.1\nJAX==0.12.0.1\n", "line 2: JAX is pinned twice"),
    ("-e /work/main\n", "line 1: '-e /work/main' is not a requirement"),
    ("jax==0.12 ; python_version<'3.13'\n", "is not an exact pin"),
])
def test_a_bad_constraints_line_is_a_value_error(text, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        read_pins(text)
