"""eval/figures.py: provenance in every figure's JSON, the --results file, the recipe hash."""
import json
import shutil
import subprocess

import jax
import pytest

from eval import figures

DUMMY = "_test_provenance_dummy"
# A recipe per size, as a figure module's SIZES would hold it (tuples and a dataclass-free dict).
DUMMY_SIZES = {"quick": {"steps": 3, "pairs": (2, 4)}, "cpu": {"steps": 30, "pairs": (2, 4)},
               "paper": {"steps": 300, "pairs": (2, 4, 8)}}
CALLS = []


@figures.register(DUMMY, settings=lambda size: DUMMY_SIZES[size])
def _dummy_figure(*, size, seed, out, **options):
    CALLS.append((size, seed))
    (out / f"{DUMMY}.csv").write_text("x\n1\n")
    return {"accuracy": {"2": 0.5 + seed / 100}, "steps": DUMMY_SIZES[size]["steps"]}


@pytest.fixture(scope="module")
def written(tmp_path_factory):
    """Runs the dummy figure through the CLI with --results; returns (out json, results json)."""
    root = tmp_path_factory.mktemp("figures")
    assert figures.main(["--only", DUMMY, "--size", "quick", "--seed", "3", "--out",
                         str(root / "out"), "--results", str(root / "results")]) == 0
    return root / "out" / f"{DUMMY}.json", root / "results" / f"{DUMMY}-quick-seed3.json"


def test_results_file_holds_the_numbers_and_provenance(written):
    out_json, results_json = written
    assert results_json.read_text() == out_json.read_text()
    doc = json.loads(results_json.read_text())
    assert doc["accuracy"] == {"2": 0.53} and doc["steps"] == 3
    prov = doc["provenance"]
    assert set(prov) == {"figure", "git_commit", "dirty", "config_hash", "size", "seed",
                         "seconds", "device", "versions"}
    assert (prov["figure"], prov["size"], prov["seed"]) == (DUMMY, "quick", 3)
    assert isinstance(prov["seconds"], float) and prov["seconds"] >= 0
    assert prov["device"] == {"platform": jax.devices()[0].platform,
                              "device_kind": jax.devices()[0].device_kind,
                              "device_count": jax.device_count()}
    assert set(prov["versions"]) == {"python", "jax", "jaxlib", "flax", "optax",
                                     "orbax-checkpoint", "numpy"}
    assert prov["versions"]["jax"] == jax.__version__
    assert all(prov["versions"].values()), prov["versions"]


def test_provenance_records_the_checkout(written, repo_root):
    prov = json.loads(written[1].read_text())["provenance"]
    head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=repo_root, capture_output=True,
                          text=True)
    if head.returncode != 0:
        # Not a git checkout (an installed copy): both stay null rather than guessed.
        assert prov["git_commit"] is None and prov["dirty"] is None
    else:
        assert prov["git_commit"] == head.stdout.strip()
        assert isinstance(prov["dirty"], bool)


def test_config_hash_is_the_recipe_at_that_size(written):
    prov = json.loads(written[1].read_text())["provenance"]
    assert prov["config_hash"] == figures.config_hash(DUMMY_SIZES["quick"])
    assert len(prov["config_hash"]) == 12 and int(prov["config_hash"], 16) >= 0
    hashes = {figures.config_hash(DUMMY_SIZES[s]) for s in figures.SIZES}
    assert len(hashes) == 3
    # Canonical: key order and tuple-vs-list do not change it; any value does.
    assert figures.config_hash({"b": (1, 2), "a": {"y": 1, "x": 2}}) == figures.config_hash(
        {"a": {"x": 2, "y": 1}, "b": [1, 2]})
    assert figures.config_hash({"a": 1}) != figures.config_hash({"a": 1.5})


def test_every_registered_figure_hashes_its_recipe():
    registered = figures.load_all()
    for name in registered:
        if name.startswith("_test"):
            continue
        hashes = {figures.config_hash(figures._SETTINGS[name](s)) for s in figures.SIZES}
        assert len(hashes) == len(figures.SIZES), name


def test_unhashable_settings_fail_before_the_figure_runs(tmp_path):
    @figures.register("_test_unhashable", settings=lambda size: {"model": {"act": object()}})
    def _fig(**_):
        raise AssertionError("the figure must not run")

    with pytest.raises(ValueError, match=r"settings\.model\.act=<object .*> is not JSON-able"):
        figures.run_figure("_test_unhashable", out=tmp_path)


def test_a_figure_may_not_return_provenance(tmp_path):
    @figures.register("_test_claims_provenance")
    def _fig(**_):
        return {"provenance": "mine"}

    with pytest.raises(ValueError, match="returned a 'provenance' key"):
        figures.run_figure("_test_claims_provenance", out=tmp_path)


@pytest.mark.skipif(shutil.which("git") is None, reason="needs git")
def test_git_state_is_dirty_only_for_tracked_code(tmp_path):
    def git(*args):
        subprocess.run(["git", "-c", "user.name=t", "-c", "user.email=t@t", *args], cwd=tmp_path,
                       check=True, capture_output=True)

    git("init", "-q")
    (tmp_path / "model.py").write_text("x = 1\n")
    (tmp_path / "results").mkdir()
    (tmp_path / "results" / "a.json").write_text("{}\n")
    git("add", ".")
    git("commit", "-q", "-m", "init")
    state = figures.git_state(tmp_path)
    assert len(state["commit"]) == 40 and state["dirty"] is False
    # Result files, committed or new, are outputs: writing them leaves the code clean.
    (tmp_path / "results" / "a.json").write_text('{"x": 1}\n')
    (tmp_path / "results" / "b.json").write_text("{}\n")
    (tmp_path / "notes.txt").write_text("untracked\n")
    assert figures.git_state(tmp_path)["dirty"] is False
    (tmp_path / "model.py").write_text("x = 2\n")
    assert figures.git_state(tmp_path)["dirty"] is True


def test_the_demo_skips_figures_registered_out_of_it(monkeypatch, tmp_path):
    """`make demo` (`--size quick`, no --only) runs every figure but those registered with
    in_demo=False; naming one with --only, or another size, still runs it."""
    ran = []
    monkeypatch.setattr(figures, "run_figure", lambda name, **kw: ran.append((name, kw["size"])))
    out = str(tmp_path)
    figures.main(["--size", "quick", "--out", out])
    demo = {n for n, _ in ran}
    assert "birdie_phonebook" not in demo
    assert demo == set(figures.load_all()) - figures._NOT_IN_DEMO
    assert {"landmark_passkey", "birdie_recall", "mac_online_adaptation"} <= demo
    ran.clear()
    figures.main(["--only", "birdie_phonebook", "--size", "quick", "--out", out])
    assert ran == [("birdie_phonebook", "quick")]
    ran.clear()
    figures.main(["--size", "cpu", "--out", out])
    assert "birdie_phonebook" in {n for n, _ in ran}
