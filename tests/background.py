"""Work that runs beside the in-process tests, on one worker thread.

The in-process tests keep one of the two cores mostly idle (XLA compiles on one thread), while
the tests that drive subprocesses (notebooks, CLIs, multi-process runs) mostly wait. So such a
test hands its subprocess part to this worker: tests/conftest.py starts every selected
`background` test's work once collection is done, in collection order (under pytest-xdist, a
module's work when the module's first test starts on its worker), and orders those tests last,
where each collects its work's result.

A test declares its work with `@beside(work)`; `work(tmp, env, **params)` gets a fresh directory,
the environment as it was when collection ended (a test's monkeypatching cannot reach a
subprocess the worker starts; pass `env` to every subprocess), and the test's parametrization;
it must not use JAX in-process (the main thread does). The test receives what it returns as the
fixture `beside`; an exception in the work is raised there, with its traceback.

    def _run_the_cli(tmp, env):
        ...subprocess.run([...], env=env)...
        return tmp / "run"

    @beside(_run_the_cli)
    def test_the_cli(beside):
        workdir = beside
        ...in-process checks...

A module may instead define `start_in_background(items)` and `stop_background()` (the notebook
executions, tests/colabs/test_notebooks.py) and use `submit` / `result` itself.
"""
import concurrent.futures
import os
import pathlib
import shutil
import tempfile

import pytest

_pool: concurrent.futures.ThreadPoolExecutor | None = None
_root: pathlib.Path | None = None
_environ: dict = {}
_futures: dict[str, concurrent.futures.Future] = {}


def beside(work):
    """Marks a test `background` and names the work whose result is its `beside` fixture."""
    def mark(test):
        test.background_work = work
        return pytest.mark.background(test)
    return mark


def environ() -> dict:
    """A copy of the environment as it was when the worker started."""
    return dict(_environ or os.environ)


def submit(key: str, fn, *args, **kwargs) -> None:
    """Queues fn(*args, **kwargs) under `key` (once per key)."""
    global _pool, _root, _environ
    if _pool is None:
        _pool = concurrent.futures.ThreadPoolExecutor(1, "background")
        _root = pathlib.Path(tempfile.mkdtemp(prefix="mnemax-background-"))
        _environ = dict(os.environ)
    if key not in _futures:
        _futures[key] = _pool.submit(fn, *args, **kwargs)


def start(item) -> None:
    """Queues the work of a test made with `beside` (tests/conftest.py, once collection is done;
    the fixture calls it too, for a test collected without the hook)."""
    if item.nodeid in _futures:
        return
    work = item.function.background_work
    params = getattr(item, "callspec", None)
    submit(item.nodeid, _run, work, params.params if params else {})


def _run(work, params):
    tmp = pathlib.Path(tempfile.mkdtemp(prefix=work.__name__.strip("_") + "-", dir=_root))
    return work(tmp, environ(), **params)


def result(key: str):
    """What the work queued under `key` returned; raises what it raised."""
    return _futures[key].result()


def stop() -> None:
    """Drops the work not started, waits for the running one, removes the directories."""
    global _pool, _root
    if _pool is None:
        return
    _pool.shutdown(wait=True, cancel_futures=True)
    shutil.rmtree(_root, ignore_errors=True)
    _pool, _root = None, None
    _futures.clear()
