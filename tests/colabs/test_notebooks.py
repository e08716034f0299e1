"""Every notebook in colabs/: the jupytext pair is in sync and the .ipynb executes.

Notebooks are discovered with a glob, so a new `colabs/NAME.py` (+ `NAME.ipynb`, made with
`jupytext --to ipynb colabs/NAME.py`) is tested as soon as it lands. Each runs in a fresh Jupyter
kernel (tests/colabs/execute_notebook.py in a subprocess) on one CPU device (XLA_FLAGS: only the
suite's compile-speed flags), in a temporary working directory, with MPLBACKEND=Agg, and must not
download.

The executions are the suite's longest tests, so they run beside the in-process tests
(tests/background.py): `test_ipynb_executes` is marked `background`, tests/conftest.py calls
`start_in_background` once collection is done (under pytest-xdist, when this module starts; the
runs then go one at a time on the background worker) and orders these tests last, where each
collects its notebook's result.
"""
import json
import os
import pathlib
import shutil
import subprocess
import sys
import tempfile
import threading
import tomllib

import jupytext
import nbformat
import pytest

import background

REPO = pathlib.Path(__file__).resolve().parents[2]
COLABS = REPO / "colabs"
NOTEBOOKS = sorted(COLABS.glob("*.py"))
RUNNER = pathlib.Path(__file__).resolve().parent / "execute_notebook.py"
TIMEOUT_S = 600  # per notebook run, waiting in the queue excluded
KERNEL_NAME = "mnemax-test-python"
# The release every notebook's install cell names: the tag of pyproject.toml's version.
RELEASE = "v" + tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["version"]
# The first cell of colabs/NAME.py: its "Open in Colab" badge (a reference-style link keeps the
# lines short), opening the notebook on the default branch.
BADGE = """[![Open In Colab][badge]][colab]

[badge]: https://colab.research.google.com/assets/colab-badge.svg
[colab]: https://colab.research.google.com/github/mnemax/mnemax/blob/main/colabs/{name}.ipynb"""


def _cells(nb):
    """(cell type, source) of each non-empty cell, whitespace at the ends ignored."""
    return [(c.cell_type, c.source.strip()) for c in nb.cells if c.source.strip()]


class Executions:
    """Notebook runs in subprocesses, one at a time on the background worker:
    `start(notebooks)`, `result(notebook)` → (exit status, stderr), `stop()` kills what still
    runs."""

    def __init__(self):
        self._root = None
        self._procs: set = set()
        self._lock = threading.Lock()

    def start(self, notebooks) -> None:
        if self._root is None:
            self._root = pathlib.Path(tempfile.mkdtemp(prefix="mnemax-notebooks-"))
            # A kernelspec whose argv is this interpreter (the venv's python), so nbclient never
            # picks another Python.
            kernels = self._root / "jupyter" / "kernels" / KERNEL_NAME
            kernels.mkdir(parents=True)
            (kernels / "kernel.json").write_text(json.dumps({
                "argv": [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
                "display_name": "mnemax test kernel", "language": "python"}))
        for py in notebooks:
            background.submit(self._key(py), self._run, py)

    @staticmethod
    def _key(py: pathlib.Path) -> str:
        return f"notebook {py.name}"

    def _env(self, tmp: pathlib.Path) -> dict:
        """This repo importable, one device, no display; the kernel inherits it."""
        env = background.environ()   # as collection ended, not what a test beside it sets
        env.pop("MNEMAX_WORKDIR", None)
        env.update({
            "JUPYTER_PATH": str(self._root / "jupyter"),
            "PYTHONPATH": os.pathsep.join([str(REPO)] + [
                p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p]),
            "MPLBACKEND": "Agg",
            "TMPDIR": str(tmp),               # notebooks' temporary workdirs land here
            "JUPYTER_PLATFORM_DIRS": "1",
            # One CPU device, as in Colab's CPU runtime (only the suite's compile-speed flags).
            "XLA_FLAGS": env["MNEMAX_TEST_XLA_FLAGS"],
        })
        return env

    def _run(self, py: pathlib.Path) -> tuple[int, str]:
        with self._lock:
            if self._root is None:
                return -1, "stopped before it started"
            tmp = self._root / py.stem
            (tmp / "work").mkdir(parents=True)
            proc = subprocess.Popen(
                [sys.executable, str(RUNNER), str(py.with_suffix(".ipynb")), str(tmp / "work"),
                 KERNEL_NAME], env=self._env(tmp), stdout=subprocess.PIPE,
                stderr=subprocess.PIPE, text=True)
            self._procs.add(proc)
        try:
            _, err = proc.communicate(timeout=TIMEOUT_S)
        except subprocess.TimeoutExpired:
            proc.kill()
            _, err = proc.communicate()
            err = f"timed out after {TIMEOUT_S} s\n{err}"
        finally:
            with self._lock:
                self._procs.discard(proc)
        return proc.returncode, err

    def result(self, py: pathlib.Path) -> tuple[int, str]:
        self.start([py])    # not started yet when collection bypassed the hook
        return background.result(self._key(py))

    def stop(self) -> None:
        """Kills the running notebook (tests/conftest.py then stops the worker)."""
        if self._root is None:
            return
        with self._lock:
            for proc in self._procs:
                proc.kill()
            shutil.rmtree(self._root, ignore_errors=True)
            self._root = None


EXECUTIONS = Executions()


def start_in_background(items) -> None:
    """tests/conftest.py, once collection is done: start the selected notebooks' runs."""
    EXECUTIONS.start([item.callspec.params["py"] for item in items])


def stop_background() -> None:
    """tests/conftest.py, at the end of the session."""
    EXECUTIONS.stop()


def test_notebooks_found():
    assert any(p.stem == "quickstart" for p in NOTEBOOKS), NOTEBOOKS


@pytest.mark.parametrize("py", NOTEBOOKS, ids=lambda p: p.stem)
def test_pair_in_sync(py):
    ipynb = py.with_suffix(".ipynb")
    assert ipynb.exists(), f"{ipynb} is missing: run `jupytext --to ipynb {py.relative_to(REPO)}`"
    from_py = _cells(jupytext.read(py))
    from_ipynb = _cells(jupytext.read(ipynb))
    assert from_py == from_ipynb, (
        f"{py.name} and {ipynb.name} differ: run `jupytext --to ipynb {py.relative_to(REPO)}`")
    # A notebook is committed without outputs (Colab shows a clean notebook).
    nb = nbformat.read(ipynb, as_version=4)
    assert all(not c.get("outputs") for c in nb.cells if c.cell_type == "code")


@pytest.mark.parametrize("py", NOTEBOOKS, ids=lambda p: p.stem)
def test_install_cell_is_colab_only(py):
    """The first code cell installs mnemax in Colab and is guarded by the google.colab check."""
    code = [c for c in jupytext.read(py).cells if c.cell_type == "code"]
    assert code and "google.colab" in code[0].source, (
        f"{py.name}: the first code cell must install mnemax when 'google.colab' in sys.modules")


def _install_section(py) -> list:
    """(cell type, source) of the install cell (the first code cell) and the cell before it."""
    cells = _cells(jupytext.read(py))
    first_code = next(i for i, (kind, _) in enumerate(cells) if kind == "code")
    return cells[max(first_code - 1, 0):first_code + 1]


def test_install_section_is_the_same_in_every_notebook():
    """One install cell (and its "Install (Colab only)" text) for all: a fix lands everywhere."""
    sections = {py.stem: _install_section(py) for py in NOTEBOOKS}
    assert sections["quickstart"][0][1].startswith("## Install (Colab only)")
    differ = sorted(name for name, s in sections.items() if s != sections["quickstart"])
    assert not differ, f"the install section of {differ} differs from quickstart.py's: copy it"


@pytest.mark.parametrize("py", NOTEBOOKS, ids=lambda p: p.stem)
def test_colab_badge_opens_this_notebook(py):
    cells = _cells(jupytext.read(py))
    assert cells[0] == ("markdown", BADGE.format(name=py.stem)), (
        f"{py.name}: the first cell must be its Open-in-Colab badge:\n{BADGE.format(name=py.stem)}")


def test_quickstart_install_cell(monkeypatch, tmp_path):
    """Outside Colab the install cell runs nothing; inside, it installs the checkout or
    MNEMAX_SOURCE, by default the release named by pyproject.toml's version (a GitHub URL goes
    through git). Every notebook has this cell (test_install_section_is_the_same_...)."""
    cell = [c for c in jupytext.read(COLABS / "quickstart.py").cells if c.cell_type == "code"][0]
    calls = []
    monkeypatch.setattr(subprocess, "run", lambda *a, **k: calls.append(a[0]))
    monkeypatch.delenv("MNEMAX_SOURCE", raising=False)
    monkeypatch.delitem(sys.modules, "google.colab", raising=False)
    ns = {}
    exec(compile(cell.source, "install-cell", "exec"), ns)
    assert calls == []
    assert ns["MNEMAX_RELEASE"] == RELEASE, (
        f"the install cells name {ns['MNEMAX_RELEASE']}, pyproject.toml's version is {RELEASE}")
    assert ns["MNEMAX_SOURCE"] == f"https://github.com/mnemax/mnemax@{RELEASE}"
    assert ns["pip_target"](ns["MNEMAX_SOURCE"]) == [
        f"git+https://github.com/mnemax/mnemax@{RELEASE}"]
    assert ns["pip_target"]("mnemax") == ["mnemax"]
    assert ns["find_checkout"](COLABS) == REPO
    assert ns["find_checkout"](tmp_path) is None

    # In "Colab" (a stand-in module) from inside the checkout: an editable install of it.
    monkeypatch.setitem(sys.modules, "google.colab", type(sys)("google.colab"))
    monkeypatch.chdir(COLABS)
    exec(compile(cell.source, "install-cell", "exec"), {})
    assert calls[-1][-2:] == ["-e", str(REPO)]
    # Outside a checkout: MNEMAX_SOURCE.
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MNEMAX_SOURCE", "/some/wheel.whl")
    exec(compile(cell.source, "install-cell", "exec"), {})
    assert calls[-1][-1] == "/some/wheel.whl"
    # Outside a checkout, MNEMAX_SOURCE unset: the release, through git.
    monkeypatch.delenv("MNEMAX_SOURCE")
    exec(compile(cell.source, "install-cell", "exec"), {})
    assert calls[-1][-1] == f"git+https://github.com/mnemax/mnemax@{RELEASE}"


# The .py of every notebook equals its .ipynb cell for cell (test_pair_in_sync), so executing the
# .ipynb runs the .py's code; it is not run a second time as a plain script.
@pytest.mark.background
@pytest.mark.parametrize("py", NOTEBOOKS, ids=lambda p: p.stem)
def test_ipynb_executes(py):
    status, err = EXECUTIONS.result(py)
    assert status == 0, f"{py.with_suffix('.ipynb').name} failed:\n{err[-4000:]}"
