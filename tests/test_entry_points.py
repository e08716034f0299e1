"""The console scripts (`pyproject.toml` [project.scripts]) and packaged configs by name: what a
user who ran `pip install` types, from any folder. `make test` installs the package (`make venv`),
so the scripts sit beside the test interpreter. `mnemax-train` itself runs in
tests/train/test_trainer.py (SIGTERM test), from a folder outside the checkout."""
import importlib
import os
import pathlib
import subprocess
import sys
import tomllib

import pytest

from benchmarks import __main__ as bench_cli
from train import main as train_main

REPO = pathlib.Path(__file__).resolve().parents[1]
SCRIPTS = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["scripts"]


def script(name: str) -> str:
    path = pathlib.Path(sys.executable).parent / name
    assert path.exists(), f"{path} is missing: install the package (make venv)"
    return str(path)


def run_script(name, *args, cwd):
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    return subprocess.run([script(name), *args], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=300)


def test_every_console_script_names_a_callable():
    assert set(SCRIPTS) == {"mnemax-train", "mnemax-figures", "mnemax-bench"}
    for target in SCRIPTS.values():
        mod, fn = target.split(":")
        assert callable(getattr(importlib.import_module(mod), fn)), target


def test_configs_resolve_by_name_or_path():
    path, variant = train_main.config_path("birdie:tiny:gated_birdie").split(":", 1)
    assert pathlib.Path(path) == REPO / "train" / "configs" / "birdie.py" and variant == \
        "tiny:gated_birdie"
    assert train_main.config_path("lm").endswith("train/configs/lm.py")
    assert train_main.config_path("train/configs/lm.py:tiny") == "train/configs/lm.py:tiny"
    argv = ["prog", "--config", "landmark:tiny", "--config.num_steps=3", "--workdir", "w"]
    out = train_main.resolve_config_flag(argv)
    assert out[2] == f"{REPO / 'train' / 'configs' / 'landmark.py'}:tiny"
    assert out[:2] + out[3:] == argv[:2] + argv[3:]        # overrides untouched
    assert train_main.resolve_config_flag(["p", "--config=lm:tiny"])[1] == \
        f"--config={REPO / 'train' / 'configs' / 'lm.py'}:tiny"
    with pytest.raises(ValueError, match=r"config='nope:tiny'.*\['birdie', 'dkvb', "
                                         r"'dkvb_encoder', 'landmark', 'lm', 'mac', 'mac_qa', "
                                         r"'memory_bench'\]"):
        train_main.config_path("nope:tiny")


def test_figures_list_outside_the_checkout(tmp_path):
    from eval import figures
    p = run_script("mnemax-figures", "--list", cwd=tmp_path)
    assert p.returncode == 0, p.stderr
    listed = dict(line.split("\t") for line in p.stdout.splitlines())
    # the families' figures (tests register dummies of their own in this process)
    registered = {n for n, fn in figures.load_all().items()
                  if fn.__module__ in figures.FIGURE_MODULES}
    assert set(listed) == registered and len(registered) >= 9
    assert listed["birdie_phonebook"] == "not in the demo"
    assert listed["landmark_passkey"] == "in the demo"


def test_bench_lists_and_refuses_unknown_names(tmp_path, capsys):
    p = run_script("mnemax-bench", "--list", cwd=tmp_path)
    assert p.returncode == 0, p.stderr
    assert [line.split("\t")[0] for line in p.stdout.splitlines()] == list(bench_cli.BENCHMARKS)
    assert bench_cli.main(["nope"]) == 2
    assert "benchmark='nope' is unknown" in capsys.readouterr().err


# Through the installed console script and `python -m`, in a process of their own: one refusal
# of each kind (an objective's setting, caught by the config check; an override naming no field,
# caught while parsing flags) and an evaluation CLI's. Every other refusal's line is checked in
# this process by tests/test_bad_input.py (`cli_in_process`, `eval_cli_in_process`), which runs
# the same `parse_flags` / `main` / `eval.cli.run` code.
@pytest.mark.parametrize("args, says", [
    (["--config", "mac:tiny", "--config.objective_config.rho=0.0"],
     "objective_config.rho=0.0 is not allowed"),
    (["--config", "lm:tiny", "--config.modle.width=3"],
     "--config.modle.width names no config field: 'modle' is unknown; did you mean 'model'?"),
])
def test_train_cli_refuses_in_one_line(tmp_path, args, says):
    """A bad field (of the trainer's config or of an objective's settings): exit code 2 and one
    error line, no traceback, nothing trained."""
    out = run_script("mnemax-train", *args, "--workdir", str(tmp_path / "run"), cwd=tmp_path)
    assert out.returncode == 2, out.stderr[-2000:]
    assert "Traceback" not in out.stderr
    lines = [l for l in out.stderr.splitlines() if l.startswith("error:")]
    assert len(lines) == 1 and says in lines[0], out.stderr[-2000:]
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_eval_cli_names_a_missing_run_in_one_line(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    out = subprocess.run([sys.executable, "-m", "eval.streaming_qa", "--workdir",
                          str(tmp_path / "none")],
                         cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 2 and "Traceback" not in out.stderr, out.stderr[-2000:]
    lines = [l for l in out.stderr.splitlines() if l.startswith("error:")]
    assert len(lines) == 1 and "holds no MAC run: no config.json there" in lines[0], \
        out.stderr[-2000:]


def test_eval_cli_runner_keeps_exit_codes_and_shortens_value_errors(capsys):
    from eval import cli

    def bad(argv):
        raise ValueError("size='huge' is not allowed;\n use one of ['cpu']")
    assert cli.run(bad) == 2
    assert capsys.readouterr().err == "error: size='huge' is not allowed; use one of ['cpu']\n"
    assert cli.run(lambda argv: {"accuracy": 1.0}) == 0      # numbers returned: success
    assert cli.run(lambda argv: 3) == 3
