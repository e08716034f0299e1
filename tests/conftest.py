"""Test-wide set-up: 8 fake CPU devices, float32 defaults, the compilation cache.

XLA_FLAGS must be set before jax is imported anywhere, so this file does it at import time.
"""
import os
import pathlib

# Compile speed: the suite compiles hundreds of small programs and runs each for milliseconds,
# so compilation is most of a cold run. LLVM optimisation level 0 compiles the same HLO (same
# XLA passes, same numerics contract) into less optimised machine code, in about half the time.
# Subprocesses that tests start get the same flags through MNEMAX_TEST_XLA_FLAGS (notebooks,
# CLIs run "as a user runs them": these flags and no fake devices).
os.environ.setdefault("MNEMAX_TEST_XLA_FLAGS", "--xla_backend_optimization_level=0")
os.environ["XLA_FLAGS"] = " ".join([
    os.environ.get("XLA_FLAGS", ""), os.environ["MNEMAX_TEST_XLA_FLAGS"],
    "--xla_force_host_platform_device_count=8"]).strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import jax  # noqa: E402
import pytest  # noqa: E402

import background  # noqa: E402  (tests/background.py)

REPO = pathlib.Path(__file__).resolve().parents[1]
# Reference vectors ship with the repo (tests/data/, see its README), so a plain clone runs every
# parity test; MNEMAX_REFERENCE points the tests at another copy (e.g. regenerated vectors).
REFERENCE = pathlib.Path(os.environ.get("MNEMAX_REFERENCE", REPO / "tests" / "data"))

# The persistent compilation cache (`make test` and .ci/run export these env vars; the same
# defaults apply here for a bare `pytest`, so reruns and the subprocesses that tests start reuse
# compiled steps). Subprocesses inherit it via the env vars.
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR",
                      str(pathlib.Path.home() / ".cache" / "mnemax" / "jax-cache"))
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "0")
jax.config.update("jax_compilation_cache_dir", os.environ["JAX_COMPILATION_CACHE_DIR"])
jax.config.update("jax_persistent_cache_min_compile_time_secs",
                  float(os.environ["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"]))
jax.config.update("jax_persistent_cache_min_entry_size_bytes",
                  int(os.environ["JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES"]))


@pytest.fixture(scope="session")
def reference_dir() -> pathlib.Path:
    if not REFERENCE.exists():
        pytest.fail(f"reference vectors not found at {REFERENCE} (tests/data/ in the repo; "
                    "MNEMAX_REFERENCE overrides)")
    return REFERENCE


def _chip_mesh(device_kind: str, num_cores: int, platform: str):
    """A one-device abstract mesh of a chip: what a model traces under in a dry run for it
    (`train.dryrun --gpu / --topology`), so the kernels that chip would run are selected on this
    CPU host (tracing and lowering only)."""
    device = jax.sharding.AbstractDevice(device_kind=device_kind, num_cores=num_cores,
                                         platform=platform)
    return jax.sharding.AbstractMesh((1,), ("data",), (jax.sharding.AxisType.Auto,),
                                     abstract_device=device)


@pytest.fixture(scope="session")
def h100_mesh():
    return _chip_mesh("NVIDIA H100 80GB HBM3", 132, "gpu")


@pytest.fixture(scope="session")
def v5e_mesh():
    return _chip_mesh("TPU v5 lite", 1, "tpu")


@pytest.fixture(scope="session")
def repo_root() -> pathlib.Path:
    return REPO


# Tests marked `background` run last: the work they wait for runs beside the in-process tests, on
# one worker thread (tests/background.py), started as soon as collection is done; under
# pytest-xdist (`make test`: two workers, `--dist loadfile`, so a module's tests stay together),
# a module's work starts with the module's first test on the worker that runs it. A test made with
# `background.beside(work)` gets its work's result as the fixture `beside`; the notebook
# executions (tests/colabs/test_notebooks.py) queue their own through the module's
# `start_in_background(items)`.
def pytest_collection_modifyitems(config, items):
    late = [i for i in items if i.get_closest_marker("background")]
    if late:
        items[:] = [i for i in items if not i.get_closest_marker("background")] + late


def _modules(items):
    """The modules that queue their own background work, with their selected tests."""
    by_module = {}
    for item in items:
        if item.get_closest_marker("background") and not hasattr(item.function,
                                                                   "background_work"):
            by_module.setdefault(item.module, []).append(item)
    return by_module


def _start_background(items):
    for item in items:
        if hasattr(item.function, "background_work"):
            background.start(item)
    for module, selected in _modules(items).items():
        module.start_in_background(selected)


def _xdist_worker(config) -> bool:
    return hasattr(config, "workerinput")


def pytest_collection_finish(session):
    if not session.config.option.collectonly and not _xdist_worker(session.config):
        _start_background(session.items)


_MODULES_STARTED: set = set()


def pytest_runtest_setup(item):
    if _xdist_worker(item.config) and item.module not in _MODULES_STARTED:
        _MODULES_STARTED.add(item.module)
        _start_background([i for i in item.session.items if i.module is item.module
                           and i.get_closest_marker("background")])


def pytest_sessionfinish(session):
    for module in _modules(session.items):
        module.stop_background()
    background.stop()


@pytest.fixture
def beside(request):
    """The return value of this test's background work (tests/background.py)."""
    background.start(request.node)
    return background.result(request.node.nodeid)
