"""Every notebook in colabs/: the jupytext pair is in sync and the .ipynb executes.

Notebooks are discovered with a glob, so a new `colabs/NAME.py` (+ `NAME.ipynb`, made with
`jupytext --to ipynb colabs/NAME.py`) is tested as soon as it lands. Each runs on one CPU device
(XLA_FLAGS: only the suite's compile-speed flags), in a temporary working directory, with
MPLBACKEND=Agg, and must not download.
"""
import json
import os
import pathlib
import subprocess
import sys

import jupytext
import nbformat
import pytest

REPO = pathlib.Path(__file__).resolve().parents[2]
COLABS = REPO / "colabs"
NOTEBOOKS = sorted(COLABS.glob("*.py"))
TIMEOUT_S = 300  # per notebook run; each is meant to take well under a minute on 2 cores
KERNEL_NAME = "mnemax-test-python"


def _cells(nb):
    """(cell type, source) of each non-empty cell, whitespace at the ends ignored."""
    return [(c.cell_type, c.source.strip()) for c in nb.cells if c.source.strip()]


@pytest.fixture
def notebook_env(monkeypatch, tmp_path):
    """The environment a notebook runs in: this repo importable, one device, no display.

    The variables reach the Jupyter kernel (which inherits os.environ). A kernelspec whose argv
    is this interpreter (the venv's python) is written to a temporary JUPYTER_PATH so nbclient
    never picks another Python."""
    kernels = tmp_path / "jupyter" / "kernels" / KERNEL_NAME
    kernels.mkdir(parents=True)
    (kernels / "kernel.json").write_text(json.dumps({
        "argv": [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
        "display_name": "mnemax test kernel", "language": "python"}))
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.setenv("JUPYTER_PATH", str(tmp_path / "jupyter"))
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(
        [str(REPO)] + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]))
    monkeypatch.setenv("MPLBACKEND", "Agg")
    monkeypatch.setenv("TMPDIR", str(tmp_path))   # notebooks' temporary workdirs land here
    monkeypatch.setenv("JUPYTER_PLATFORM_DIRS", "1")
    # One CPU device, as in Colab's CPU runtime (only the suite's compile-speed flags).
    monkeypatch.setenv("XLA_FLAGS", os.environ["MNEMAX_TEST_XLA_FLAGS"])
    monkeypatch.delenv("MNEMAX_WORKDIR", raising=False)
    return work


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


def test_quickstart_install_cell(monkeypatch, tmp_path):
    """Outside Colab the install cell runs nothing; inside, it installs the checkout or
    MNEMAX_SOURCE (a GitHub URL goes through git)."""
    cell = [c for c in jupytext.read(COLABS / "quickstart.py").cells if c.cell_type == "code"][0]
    calls = []
    monkeypatch.setattr(subprocess, "run", lambda *a, **k: calls.append(a[0]))
    monkeypatch.delenv("MNEMAX_SOURCE", raising=False)
    monkeypatch.delitem(sys.modules, "google.colab", raising=False)
    ns = {}
    exec(compile(cell.source, "install-cell", "exec"), ns)
    assert calls == []
    assert ns["MNEMAX_SOURCE"] == "https://github.com/mnemax/mnemax"
    assert ns["pip_target"]("https://github.com/mnemax/mnemax") == [
        "git+https://github.com/mnemax/mnemax"]
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


# The .py of every notebook equals its .ipynb cell for cell (test_pair_in_sync), so executing the
# .ipynb runs the .py's code; it is not run a second time as a plain script.
@pytest.mark.parametrize("py", NOTEBOOKS, ids=lambda p: p.stem)
def test_ipynb_executes(py, notebook_env):
    from jupyter_client.kernelspec import KernelSpecManager
    from nbclient import NotebookClient

    spec = KernelSpecManager().get_kernel_spec(KERNEL_NAME)
    assert spec.argv[0] == sys.executable  # the kernel is this venv's Python
    nb = nbformat.read(py.with_suffix(".ipynb"), as_version=4)
    client = NotebookClient(nb, timeout=TIMEOUT_S, kernel_name=KERNEL_NAME,
                            resources={"metadata": {"path": str(notebook_env)}})
    client.execute()  # raises CellExecutionError naming the failing cell
    errors = [o for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", [])
              if o.get("output_type") == "error"]
    assert not errors, errors
