"""The benchmark harness and `benchmarks.trainer` at a tiny size (a smoke test: no time asserted)."""
import json
import math

import jax
import numpy as np
import pytest

from benchmarks import harness
from benchmarks import trainer as bench
from train import chips


def test_time_fn_calls_warmup_plus_runs():
    calls = []

    def fn():
        calls.append(1)
        return jax.numpy.ones(3)

    t = harness.time_fn(fn, warmup=2, runs=3)
    assert len(calls) == 5
    assert t["runs"] == 3 and len(t["times_s"]) == 3
    assert t["min_s"] <= t["median_s"]
    assert t["median_s"] == sorted(t["times_s"])[1]


def test_write_result(tmp_path):
    path = harness.write_result("unit", {"x": 1}, out_dir=tmp_path)
    doc = json.loads(path.read_text())
    assert path.name == f"unit-{harness.device_tag()}.json"
    assert doc["x"] == 1 and doc["benchmark"] == "unit"
    assert doc["device"]["platform"] == jax.devices()[0].platform
    assert "jax" in doc["versions"] and "python" in doc["versions"]


def test_landmark_attention_benchmark_runs_and_saves_as_it_goes(tmp_path, monkeypatch):
    """The attention benchmark on CPU at one tiny length and context (no time asserted): every
    candidate recorded (Pallas and the official kernel skipped with a reason). Then a run
    stopped during its second length: the file holds the first, marked incomplete."""
    from benchmarks import landmark_attention as bla
    bla.main(["--lengths", "128", "--contexts", "256", "--runs", "1", "--warmup", "0",
              "--out_dir", str(tmp_path)])
    path = tmp_path / f"landmark_attention-{harness.device_tag()}.json"
    doc = json.loads(path.read_text())
    assert doc["complete"] is True and [p.name for p in tmp_path.iterdir()] == [path.name]
    (row,), (inf,) = doc["training_fwd_bwd"], doc["inference_per_token"]
    assert row["T"] == 128 and inf["context"] == 256 and inf["cache_blocks"] == 4
    for key in ("dense_causal", "landmark_xla", "dot_product_attention"):
        assert row[key]["min_s"] <= row[key]["median_s"], key
    assert "skipped" in row["landmark_pallas"] and "skipped" in row["official_triton"]
    assert row["ratio"] == row["landmark_s"] / row["dense_causal_s"]

    def stop_at_256(T, *args, **kwargs):
        if T == 256:
            raise KeyboardInterrupt    # what a lent machine's time limit does
        return {"T": T, "ratio": 0.5}
    monkeypatch.setattr(bla, "train_step_times", stop_at_256)
    with pytest.raises(KeyboardInterrupt):
        bla.main(["--lengths", "128,256", "--out_dir", str(tmp_path)])
    doc = json.loads(path.read_text())
    assert doc["complete"] is False and doc["training_fwd_bwd"] == [{"T": 128, "ratio": 0.5}]
    assert doc["inference_per_token"] == []


def test_flops_per_token_formula():
    """6·N + 12·L·T·D, with the input table left out of N only when embeddings are untied."""
    c = bench.make_config("tiny", dtype="float32", num_devices=1)
    V, D, L, T = c.model.vocab_size, c.model.width, c.model.num_layers, c.seq_len
    params = {"embed": np.zeros((V, D)), "w": np.zeros((D, 3 * D))}
    tied = chips.matmul_flops_per_token(c, params)
    assert tied["n_params_matmul"] == V * D + 3 * D * D
    assert tied["flops_per_token"] == 6 * (V * D + 3 * D * D) + 12 * L * T * D
    c.model.tie_embeddings = False
    untied = chips.matmul_flops_per_token(c, {**params, "head": np.zeros((D, V))})
    assert untied["n_params_total"] == 2 * V * D + 3 * D * D
    assert untied["n_params_matmul"] == V * D + 3 * D * D


def test_bad_arguments():
    with pytest.raises(ValueError, match="size="):
        bench.make_config("huge", dtype="float32", num_devices=1)
    with pytest.raises(ValueError, match="steps="):
        bench.run("tiny", steps=0)
    with pytest.raises(ValueError, match="dtype="):
        bench.run("tiny", dtype="int8")


def test_spec_peaks_by_device_kind():
    assert bench.spec_peak("NVIDIA H100 80GB HBM3", "bfloat16") == 989.4e12
    assert bench.spec_peak("NVIDIA H100 PCIe", "float16") == 756e12
    assert bench.spec_peak("TPU v5 lite", "bfloat16") == 197e12
    assert bench.spec_peak("TPU v5p", "bfloat16") == 459e12
    assert bench.spec_peak("cpu", "float32") is None
    assert bench.spec_peak("NVIDIA H200", "float32") is None


def test_trainer_benchmark_tiny(tmp_path):
    res = bench.run("tiny", steps=2, warmup=1, devices=1, peak_n=256, out_dir=tmp_path,
                    loop_steps=6, log_every=2, checkpoint_every=3)
    doc = json.loads((tmp_path / f"trainer-{harness.device_tag()}.json").read_text())
    for key in ("device", "versions", "shapes", "step_time", "peak", "tokens_per_s", "mfu",
                "flops_per_token", "flops_formula"):
        assert key in doc, key
    assert doc["complete"] is True and doc["peak"]["flops_per_s_after"] > 0
    s = doc["shapes"]
    assert (s["batch_size"], s["seq_len"], s["width"], s["devices_used"]) == (32, 64, 64, 1)
    # The tiny LM (train/configs/lm.py:tiny): tied 320×64 table, 2 blocks of 4·D² attention,
    # 2·D·4D GELU MLP and two norm scales, then a final norm.
    D = 64
    assert doc["n_params_total"] == 320 * D + 2 * (4 * D * D + 8 * D * D + 2 * D) + D
    assert doc["tokens_per_step"] == 32 * 64
    assert math.isclose(doc["tokens_per_s"], 32 * 64 / doc["step_time"]["median_s"])
    assert math.isclose(doc["mfu"], doc["model_flops_per_s"] / doc["peak_flops_per_s_total"])
    assert doc["mfu"] > 0 and math.isfinite(doc["mfu"])
    assert doc["peak"]["dtype"] == "float32" and doc["peak"]["n"] == 256
    assert doc["peak"]["reps"] == 1  # one product per call on a CPU
    assert math.isfinite(res["last_loss"])
    # the real loop: trainer.train's own rows after the first (the compilation), the spec's MFU
    # null on a CPU
    loop = doc["real_loop"]
    assert len(loop["tokens_per_s_rows"]) == 2 and loop["tokens_per_s"] > 0
    assert math.isclose(loop["mfu_measured_peak"],
                        loop["tokens_per_s"] * doc["flops_per_token"] / doc["peak_flops_per_s_total"])
    assert doc["mfu_spec"] is None and loop["mfu_spec"] is None
    # 'auto' attention is the XLA path on a CPU: no second step to compare with
    assert (s["attention_impl"], s["attention_used"]) == ("auto", "xla")
    assert doc["step_with_xla_attention"] is None


def test_trainer_benchmark_step_and_real_loop_are_one_program(tmp_path, monkeypatch):
    """The fixed-batch step and the real loop's step lower to the same program, so that JAX's
    persistent compilation cache (on in benchmarks/accelerator.sh) spares the loop a compile of
    the 350M step on a lent GPU."""
    make_train_step = bench.trainer.make_train_step
    programs = []

    def recording(run):
        step = make_train_step(run)

        def first_call_lowers(state, batch):
            if not getattr(first_call_lowers, "lowered", False):
                first_call_lowers.lowered = True
                programs.append(step.lower(state, batch).as_text())
            return step(state, batch)
        return first_call_lowers
    monkeypatch.setattr(bench.trainer, "make_train_step", recording)
    bench.run("tiny", steps=1, warmup=0, devices=1, peak_n=256, out_dir=tmp_path,
              loop_steps=2, log_every=1, checkpoint_every=0)
    assert len(programs) == 2 and programs[0] == programs[1]


def test_attention_used_by_platform():
    cfg = lambda **kw: bench.make_config("350m", num_devices=1, **kw)  # noqa: E731
    assert bench.attention_used(cfg(dtype="bfloat16"), "gpu") == "cudnn"
    assert bench.attention_used(cfg(dtype="bfloat16", attention="cudnn"), "gpu") == "cudnn"
    assert bench.attention_used(cfg(dtype="bfloat16"), "tpu") == "splash"
    assert bench.attention_used(cfg(dtype="bfloat16"), "cpu") == "xla"
    assert bench.attention_used(cfg(dtype="float32"), "gpu") == "xla"     # cuDNN: 16-bit only
    assert bench.attention_used(cfg(dtype="bfloat16", attention="xla"), "gpu") == "xla"
    with pytest.raises(ValueError, match=r"attention='flash' is not allowed; use one of"):
        cfg(dtype="bfloat16", attention="flash")


def test_trainer_benchmark_times_the_xla_attention_beside_a_kernel(tmp_path, monkeypatch):
    # Where the model runs a fused kernel (cuDNN's, on a GPU), the same step with the XLA
    # attention is timed in the same run; here both steps are XLA's, so the speedup is ~1.
    monkeypatch.setattr(bench, "attention_used", lambda config, platform: "cudnn")
    bench.run("tiny", steps=2, warmup=1, devices=1, peak_n=256, out_dir=tmp_path,
              loop_steps=4, log_every=2, checkpoint_every=0)
    doc = json.loads((tmp_path / f"trainer-{harness.device_tag()}.json").read_text())
    base = doc["step_with_xla_attention"]
    assert base["attention"] == "xla" and base["step_time"]["runs"] == 2
    assert math.isclose(base["speedup"], base["step_time"]["median_s"] / doc["step_time"]["median_s"])
    assert math.isclose(base["tokens_per_s"], 32 * 64 / base["step_time"]["median_s"])


def test_a_failed_xla_attention_baseline_keeps_the_run(tmp_path, monkeypatch):
    """On one GPU the 350M step with the XLA attention may run out of memory where cuDNN's
    fits: the baseline's error is recorded and the run's own step and loop are kept."""
    from eval import report
    monkeypatch.setattr(bench, "attention_used", lambda config, platform: "cudnn")
    time_step = bench.time_step

    def xla_runs_out_of_memory(config, *args, **kwargs):
        if config.model.attention_impl == "xla":
            raise MemoryError("RESOURCE_EXHAUSTED: Out of memory allocating 34359738368 bytes.")
        return time_step(config, *args, **kwargs)
    monkeypatch.setattr(bench, "time_step", xla_runs_out_of_memory)
    bench.run("tiny", steps=1, warmup=0, devices=1, peak_n=256, out_dir=tmp_path,
              loop_steps=2, log_every=1, checkpoint_every=0)
    doc = json.loads((tmp_path / f"trainer-{harness.device_tag()}.json").read_text())
    assert doc["step_with_xla_attention"] == {
        "attention": "xla",
        "error": "MemoryError: RESOURCE_EXHAUSTED: Out of memory allocating 34359738368 bytes."}
    assert doc["tokens_per_s"] > 0 and doc["real_loop"]["tokens_per_s"] > 0
    assert "; the step with the XLA attention failed (MemoryError: RESOURCE_EXHAUSTED" in (
        report.trainer_summary(doc))


def test_trainer_benchmark_keeps_its_step_when_stopped_in_the_real_loop(tmp_path, monkeypatch):
    """The file is written before the real loop ("complete": false) and again after it: a run
    stopped by a lent machine's time limit during the loop keeps its step's numbers."""
    from eval import report

    def stopped(*args, **kwargs):
        raise KeyboardInterrupt
    monkeypatch.setattr(bench, "real_loop", stopped)
    with pytest.raises(KeyboardInterrupt):
        bench.run("tiny", steps=1, warmup=0, devices=1, peak_n=256, out_dir=tmp_path)
    doc = json.loads((tmp_path / f"trainer-{harness.device_tag()}.json").read_text())
    assert doc["complete"] is False and doc["real_loop"] is None and doc["tokens_per_s"] > 0
    assert doc["peak"]["flops_per_s_after"] is None
    assert "**the run stopped before its real loop ended**" in report.trainer_summary(doc)


def test_trainer_benchmark_keeps_its_real_loop_when_stopped_in_the_baseline(tmp_path,
                                                                           monkeypatch):
    """The real loop (the MFU goal's measurement) runs before the step with the XLA attention:
    a run stopped by a time limit during that baseline keeps its step and its loop."""
    from eval import report
    monkeypatch.setattr(bench, "attention_used", lambda config, platform: "cudnn")
    time_step = bench.time_step

    def stopped_in_the_baseline(config, *args, **kwargs):
        if config.model.attention_impl == "xla":
            raise KeyboardInterrupt
        return time_step(config, *args, **kwargs)
    monkeypatch.setattr(bench, "time_step", stopped_in_the_baseline)
    with pytest.raises(KeyboardInterrupt):
        bench.run("tiny", steps=1, warmup=0, devices=1, peak_n=256, out_dir=tmp_path,
                  loop_steps=2, log_every=1, checkpoint_every=0)
    doc = json.loads((tmp_path / f"trainer-{harness.device_tag()}.json").read_text())
    assert doc["complete"] is False and doc["step_with_xla_attention"] is None
    assert doc["tokens_per_s"] > 0 and doc["real_loop"]["tokens_per_s"] > 0
    summary = report.trainer_summary(doc)
    assert "; the real loop (data, metrics, checkpoints)" in summary
    assert "**the run stopped before the step with the XLA attention ended**" in summary


@pytest.mark.skipif(chips.has_compiler("tpu"), reason="libtpu is installed")
def test_aot_compile_names_the_missing_compiler(tmp_path):
    """Without libtpu (a separate venv has it, see benchmarks/aot_compile.py) the deviceless
    compile says what to install, before anything is written; an unknown GPU target is named."""
    from benchmarks import aot_compile
    out = tmp_path / "aot.json"
    with pytest.raises(SystemExit, match=r"libtpu is not installed.*jax\[tpu\]"):
        aot_compile.main(["--gpu", "", "--out", str(out)])
    assert not out.exists()
    with pytest.raises(SystemExit, match=r"GPU targets \['v100'\] are unknown; allowed"):
        aot_compile.main(["--tpu", "", "--gpu", "v100", "--out", str(out)])


# ptxas -v as XLA logs it (TF_CPP_VMODULE=subprocess_compilation=3) and XLA's thunk sequence,
# excerpts of a deviceless H100 compile (benchmarks.aot_compile, T 8192, D 64, with segments).
PTXAS_LOG = """\
I1207 04:34:34.431020    9295 subprocess_compilation.cc:313] /usr/local/bin/ptxas /tmp/tempfile-\
vm-ba6de25e5c48e927-9295-66203be1f9d3c -o /tmp/tempfile-vm-ba6de25e5c48e927-9295-66203be1f9dce \
-arch=sm_90a --warn-on-spills -v -v
I1207 04:37:49.002223   10796 subprocess_compilation.cc:356] ptxas info    : 0 bytes gmem
ptxas info    : Compiling entry function 'wrapped_transpose' for 'sm_90a'
ptxas info    : Function properties for wrapped_transpose
    0 bytes stack frame, 0 bytes spill stores, 0 bytes spill loads
ptxas info    : Used 12 registers, used 0 barriers
I1207 04:34:28.485984    9249 subprocess_compilation.cc:349] ptxas warning : Registers are \
spilled to local memory in function 'landmark_attention_dkdv', 16 bytes spill stores, 16 bytes \
spill loads
ptxas info    : 0 bytes gmem
ptxas info    : Compiling entry function 'landmark_attention_dkdv' for 'sm_90a'
ptxas info    : Function properties for landmark_attention_dkdv
    16 bytes stack frame, 16 bytes spill stores, 16 bytes spill loads
ptxas info    : Used 255 registers, used 1 barriers, 16 bytes cumulative stack size
I1207 04:34:34.756512    9320 subprocess_compilation.cc:356] ptxas info    : 0 bytes gmem
ptxas info    : Compiling entry function 'landmark_attention_fwd' for 'sm_90a'
ptxas info    : Function properties for landmark_attention_fwd
    0 bytes stack frame, 0 bytes spill stores, 0 bytes spill loads
ptxas info    : Used 160 registers, used 1 barriers
"""
THUNKS = """\
002: kCustomKernel [source       | next=006 (4)] wrapped_transpose grid: [8192, 1, 1] threads: \
[128, 1, 1]  shared_memory: 0 bytes
006: kCustomKernel [prev=004 (2) | next=007 (1)] landmark_attention_fwd grid: [128, 1, 8] \
threads: [128, 1, 1]  shared_memory: 41216 bytes
009: kCustomKernel [prev=008 (1) | next=011 (2)] landmark_attention_dq grid: [128, 1, 8] \
threads: [128, 1, 1]  shared_memory: 49408 bytes
010: kCustomKernel [prev=007 (3) | next=011 (1)] landmark_attention_dkdv grid: [128, 1, 8] \
threads: [128, 1, 1]  shared_memory: 58624 bytes
"""


def test_gpu_kernel_resources_read_from_ptxas_and_the_thunk_sequence():
    """Each landmark kernel's registers and spills (ptxas) and launch (XLA), other kernels left
    out; a kernel ptxas did not report (dq here) keeps its launch. And which ptxas XLA ran."""
    from benchmarks import aot_compile
    assert aot_compile.PTXAS_RUN.search(PTXAS_LOG)[1] == "/usr/local/bin/ptxas"
    got = aot_compile.gpu_kernel_resources(PTXAS_LOG, THUNKS)
    launch = {"threads": [128, 1, 1], "grid": [128, 1, 8]}
    assert got == {
        "dkdv": {"registers": 255, "spill_stores": 16, "spill_loads": 16, "stack_frame": 16,
                 **launch, "shared_memory": 58624},
        "dq": {**launch, "shared_memory": 49408},
        "fwd": {"registers": 160, "spill_stores": 0, "spill_loads": 0, "stack_frame": 0,
                **launch, "shared_memory": 41216}}


def test_aot_compile_refuses_a_bad_gpu_launch(tmp_path):
    from benchmarks import aot_compile
    out = tmp_path / "aot.json"
    with pytest.raises(SystemExit, match=r"--gpu_launch entries \['64,64,4', '64,64,w,2'\] are "
                                         r"not four integers block_q,block_k,num_warps,"):
        aot_compile.main(["--tpu", "", "--gpu", "h100", "--out", str(out),
                          "--gpu_launch", "64,64,4,2;64,64,4;64,64,w,2"])
    assert not out.exists()


def test_tile_sweep_times_each_configuration_and_picks_the_fastest():
    """The GPU kernel's sweep in interpret mode on CPU (no time asserted): each configuration
    reaches the kernel and is timed, the fastest is the best, the ratios are against the
    dot_product_attention timed beside; a configuration the kernel refuses is an error row."""
    from benchmarks import landmark_attention as bla
    # The sweep's lists: the kernel's default for the head dimension first, no repeats.
    assert bla.sweep_tiles("pallas_gpu", 64) == list(bla.GPU_TILES)
    assert bla.sweep_tiles("pallas_gpu", 128)[0] == (64, 64, 8, 2)
    assert sorted(bla.sweep_tiles("pallas_gpu", 128)) == sorted(bla.GPU_TILES)
    assert bla.sweep_tiles("pallas_tpu", 64) == list(bla.TPU_TILES)
    tiles = ((16, 16, 4, 2), (32, 16, 8, 1), (16, 16, 3, 2))
    out = bla.tile_sweep(64, jax.numpy.float32, kernel="pallas_gpu", tiles=tiles, runs=1,
                         warmup=0, head_dim=32, interpret=True)
    assert out["D"] == 32
    ok, bad = out["configs"][:2], out["configs"][2]
    assert [tuple(r[k] for k in ("block_q", "block_k", "num_warps", "num_stages"))
            for r in out["configs"]] == list(tiles)
    assert all(r["min_s"] <= r["median_s"] for r in ok)
    assert bad["error"] == "ValueError: num_warps=3 must be one of 1, 2, 4, 8, 16"
    assert out["best"] == min(ok, key=lambda r: r["median_s"])
    dpa = out["dot_product_attention"]["median_s"]
    assert out["best_over_dot_product_attention"] == out["best"]["median_s"] / dpa
    assert out["default_over_dot_product_attention"] == ok[0]["median_s"] / dpa


def test_accelerator_script_refuses_an_unknown_step(repo_root):
    # The GPU run is one shot on a lent machine: a misspelt step fails at once, before any
    # benchmark or install runs.
    import subprocess
    r = subprocess.run(["bash", str(repo_root / "benchmarks" / "accelerator.sh"), "attention",
                        "350M"], capture_output=True, text=True, timeout=60)
    assert r.returncode == 2 and r.stdout == ""
    assert r.stderr == "error: step '350M' is unknown; use attention, 125m or 350m\n"
