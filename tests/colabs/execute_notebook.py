"""Executes one notebook as Colab would, in a fresh Jupyter kernel: `python execute_notebook.py
NOTEBOOK.ipynb WORKDIR KERNEL_NAME`. Exit status 0 when every cell ran without an error; else
the error (nbclient's CellExecutionError names the failing cell) on stderr and exit status 1.

Run by tests/colabs/test_notebooks.py in a subprocess whose environment (JUPYTER_PATH with a
kernelspec for this interpreter, PYTHONPATH, XLA_FLAGS, MPLBACKEND, TMPDIR) the test sets.
"""
import sys

import nbformat
from jupyter_client.kernelspec import KernelSpecManager
from nbclient import NotebookClient

TIMEOUT_S = 300  # per cell; each notebook is meant to take well under a minute on 2 cores


def main(path: str, workdir: str, kernel_name: str) -> int:
    spec = KernelSpecManager().get_kernel_spec(kernel_name)
    if spec.argv[0] != sys.executable:
        print(f"kernel {kernel_name} runs {spec.argv[0]}, not {sys.executable}", file=sys.stderr)
        return 1
    nb = nbformat.read(path, as_version=4)
    client = NotebookClient(nb, timeout=TIMEOUT_S, kernel_name=kernel_name,
                            resources={"metadata": {"path": workdir}})
    try:
        client.execute()
    except Exception as e:   # CellExecutionError names the cell; anything else is also a failure
        print(f"{type(e).__name__}: {e}", file=sys.stderr)
        return 1
    errors = [o for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", [])
              if o.get("output_type") == "error"]
    if errors:
        print(errors, file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(*sys.argv[1:4]))
