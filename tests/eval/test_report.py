"""eval/report.py: README tables built from result files, and --check on the repository."""
import json
import shutil
import subprocess
import sys

import pytest

from eval import report


def _write_figure(results, name, size, seed, numbers, **prov):
    path = results / "figures" / f"{name}-{size}-seed{seed}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    provenance = {"figure": name, "git_commit": "0123456789abcdef" * 2 + "01234567",
                  "dirty": False, "config_hash": "abc", "size": size, "seed": seed,
                  "seconds": 41.25, "device": {"platform": "cpu", "device_kind": "cpu",
                                               "device_count": 1},
                  "versions": {"jax": "0.12.0"}, **prov}
    path.write_text(json.dumps({**numbers, "provenance": provenance}))


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    """Hand-made result files: lm_mqar at cpu seeds 2 and 0 (written out of order) and quick seed 1
    without final_loss; birdie_recall at one seed; two benchmark files."""
    root = tmp_path_factory.mktemp("results")
    _write_figure(root, "lm_mqar", "cpu", 2, {"accuracy": 0.8125, "no_binding": 0.125,
                                              "final_loss": 1.5})
    _write_figure(root, "lm_mqar", "cpu", 0, {"accuracy": 0.75, "no_binding": 0.25,
                                              "final_loss": 2.0}, dirty=True)
    _write_figure(root, "lm_mqar", "quick", 1, {"accuracy": 0.5, "no_binding": 0.125})
    _write_figure(root, "birdie_recall", "cpu", 0, {
        "accuracy": {"transformer_ntp": {"2": 1.0, "10": 0.5}, "gated_ntp": {"2": 0.25}},
        "no_binding_baseline": {"2": 0.5, "10": 0.1}})
    # A stray file that is not a run's result is not read.
    (root / "figures" / "lm_mqar-notes.json").write_text("not json")
    bench = root / "benchmarks"
    bench.mkdir()
    common = {"versions": {"jax": "0.12.0"}, "time_utc": "2026-01-02T03:04:05Z"}
    (bench / "mac-cpu.json").write_text(json.dumps({
        "benchmark": "mac", "variant": "tiny", "shapes": {"D": 64, "L": 2},
        "device": {"platform": "cpu", "device_kind": "cpu", "device_count": 1},
        "adapt_per_document": {"mac_amortize_s": 0.0015, "finetune_step_s": 0.003,
                               "time_ratio_mac_over_ft": 0.5}, **common}))
    (bench / "landmark_attention-nvidia_h100.json").write_text(json.dumps({
        "benchmark": "landmark_attention",
        "device": {"platform": "gpu", "device_kind": "NVIDIA H100", "device_count": 2},
        "training_fwd_bwd": [{"T": 512, "ratio": 1.25}, {"T": 2048, "ratio": 0.5}],
        "inference_per_token": [{"context": 4096, "ratio": 0.0625}], **common}))
    return root


def test_figure_table_has_a_column_per_committed_run(results):
    table = report.BUILDERS["lm_mqar"](results)
    lines = table.splitlines()
    assert lines[0] == "| `lm_mqar` | `quick`, seed 1 | `cpu`, seed 0 | `cpu`, seed 2 |"
    assert lines[1] == "|---|---|---|---|"
    assert lines[2] == "| test answer accuracy | 0.500 | 0.750 | 0.812 |"
    assert lines[3].endswith("| 0.125 | 0.250 | 0.125 |")
    assert lines[4] == "| final train loss | – | 2.000 | 1.500 |"
    assert lines[-1] == ("From `results/figures/lm_mqar-*.json` (3 files; commit 0123456, "
                         "0123456 (dirty); device cpu).")


def test_curves_join_values_by_x_and_mark_missing_ones(results):
    lines = report.BUILDERS["birdie_recall"](results).splitlines()
    assert lines[0] == "| answer accuracy at 2 / 10 pairs | `cpu`, seed 0 |"
    assert lines[2] == "| transformer_ntp | 1.000 / 0.500 |"
    assert lines[3] == "| gated_ntp | 0.250 / – |"
    assert lines[4] == "| no_binding (a random value from the prompt) | 0.500 / 0.100 |"


def test_every_figure_has_a_builder_that_says_when_nothing_is_committed(results):
    from eval import figures
    names = {n for n in figures.load_all() if not n.startswith("_test")}
    assert names <= set(report.BUILDERS)
    assert report.BUILDERS["mac_retention"](results) == (
        "`mac_retention`: no committed results yet (`results/figures/mac_retention-SIZE-seedS"
        ".json`).")


def test_benchmarks_table(results):
    lines = report.BUILDERS["benchmarks"](results).splitlines()
    assert lines[0] == "| benchmark | device | result | measured | file |"
    assert lines[2] == (
        "| `landmark_attention` | NVIDIA H100 ×2 | training fwd+bwd ÷ dense causal 1.25 / 0.50 "
        "at T 512 / 2048; per-token memory inference ÷ full KV 0.062 at 4k context | "
        "2026-01-02, jax 0.12.0 | `results/benchmarks/landmark_attention-nvidia_h100.json` |")
    assert lines[3] == (
        "| `mac` | CPU | g forward per document 1.5 ms vs a fine-tuning step 3 ms: **0.500** "
        "(variant tiny, D 64, L 2) | 2026-01-02, jax 0.12.0 | `results/benchmarks/mac-cpu.json` |")


def test_landmark_attention_summary_marks_failed_candidates_and_a_partial_run():
    """A candidate that failed (dense attention out of memory at 32k) reads "—"; a run stopped
    part-way (a lent machine's time limit) says so."""
    d = {"training_fwd_bwd": [
        {"T": 2048, "ratio": 0.8, "pallas_over_dot_product_attention": 1.25},
        {"T": 32768, "ratio": None, "pallas_over_dot_product_attention": 1.1}],
        "inference_per_token": [], "complete": False}
    assert report.landmark_attention_summary(d) == (
        "training fwd+bwd ÷ dense causal 0.80 / — at T 2048 / 32768; Pallas ÷ "
        "jax.nn.dot_product_attention 1.25 / 1.10; **the run stopped part-way**: these are the "
        "lengths it finished")


def test_tile_sweep_and_kernel_resources_in_the_benchmark_rows():
    """The tile sweep's fastest configuration with its ratio and the default's; a GPU target's
    launch, its most registers and each kernel's largest spill ("none" without)."""
    row = {"block_q": 64, "block_k": 64, "num_warps": 8, "num_stages": 2, "median_s": 1.0}
    d = {"training_fwd_bwd": [], "inference_per_token": [], "complete": True,
         "tile_sweep": [{"T": 8192, "D": 64, "configs": [{"error": "x"}, row], "best": row,
                         "best_over_dot_product_attention": 1.234,
                         "default_over_dot_product_attention": None},
                        {"T": 8192, "D": 128, "configs": [{"error": "x"}]}]}
    assert report.landmark_attention_summary(d) == (
        "tile sweep at T 8192, D 64 (2 configurations): fastest 64×64 tiles, 8 warps, 2 stages, "
        "÷ jax.nn.dot_product_attention 1.23 (default —); tile sweep at T 8192, D 128: no "
        "configuration ran")

    def case(dkdv_spill, dtype="bfloat16"):
        r = {"registers": 200, "spill_stores": 0, "shared_memory": 1}
        return {"ok": True, "dtype": dtype, "resources": {
            "fwd": r, "dkdv": {**r, "registers": 255, "spill_stores": dkdv_spill}}}
    gpu = {"topology": "h100", "device_kind": "NVIDIA H100 80GB HBM3", "devices": 1,
           "launch": {"block_q": 32, "block_k": 64, "num_warps": 4, "num_stages": 3},
           "cases": [case(0), case(120), case(3000, "float32")]}
    tpu = {"topology": "v4", "device_kind": "TPU v4", "devices": 2, "cases": [{"ok": True}]}
    assert report.aot_compile_summary({"targets": [tpu, gpu, {**gpu, "launch": "default",
                                                               "cases": [case(0)]}]}) == (
        "deviceless compile (no chip) of the Pallas kernels' forward + dk/dv + dq, cases "
        "compiled: TPU v4 ×2 1/1; NVIDIA H100 80GB HBM3 3/3 (32×64 tiles, 4 warps, 3 stages: "
        "bfloat16 ≤ 255 registers, spill stores dkdv 120 B; float32 ≤ 255 registers, spill "
        "stores dkdv 3000 B); NVIDIA H100 80GB HBM3 1/1 (bfloat16 ≤ 255 registers, spill "
        "stores none)")


def test_render_fills_markers_and_rejects_bad_ones(results):
    readme = "intro\n<!-- report:lm_mqar -->\nold numbers\n<!-- /report:lm_mqar -->\nend\n"
    new = report.render(readme, results)
    assert new.startswith("intro\n<!-- report:lm_mqar -->\n| `lm_mqar` |")
    assert new.endswith("device cpu).\n<!-- /report:lm_mqar -->\nend\n")
    assert report.render(new, results) == new
    with pytest.raises(ValueError, match=r"report:nope is unknown; allowed: \["):
        report.render("<!-- report:nope -->\n<!-- /report:nope -->\n", results)
    with pytest.raises(ValueError, match=r"\['lm_mqar'\] are not closed"):
        report.render("<!-- report:lm_mqar -->\nx\n", results)


def test_check_on_a_copy_fails_with_one_line_when_a_number_differs(results, tmp_path,
                                                                  repo_root):
    readme = tmp_path / "README.md"
    readme.write_text("<!-- report:benchmarks -->\n<!-- /report:benchmarks -->\n")
    args = ["--readme", str(readme), "--results", str(results)]
    assert report.main(args + ["--check"]) == 1
    assert report.main(args) == 0
    assert report.main(args + ["--check"]) == 0
    readme.write_text(readme.read_text().replace("0.500", "0.400"))
    r = subprocess.run([sys.executable, "-m", "eval.report", "--check", *args], cwd=repo_root,
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 1
    assert r.stderr.count("\n") == 1 and "out of date in sections ['benchmarks']" in r.stderr


def test_readme_tables_come_from_the_committed_files(repo_root):
    r = subprocess.run([sys.executable, "-m", "eval.report", "--check"], cwd=repo_root,
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    readme = (repo_root / "README.md").read_text()
    assert "<!-- report:benchmarks -->" in readme


def test_bad_result_files_are_named(tmp_path):
    (tmp_path / "figures").mkdir()
    (tmp_path / "figures" / "lm_mqar-cpu-seed0.json").write_text('{"accuracy": 1.0}')
    with pytest.raises(ValueError, match="lm_mqar-cpu-seed0.json has no provenance"):
        report.BUILDERS["lm_mqar"](tmp_path)
    shutil.rmtree(tmp_path / "figures")
    (tmp_path / "benchmarks").mkdir()
    (tmp_path / "benchmarks" / "x-cpu.json").write_text(json.dumps(
        {"benchmark": "x", "device": {}, "versions": {}}))
    with pytest.raises(ValueError, match=r"benchmark='x' in .*x-cpu.json has no summary"):
        report.BUILDERS["benchmarks"](tmp_path)


def test_demo_table_checks_each_quick_figure_against_its_bar(tmp_path):
    """One seed meets the passkey and recall bars, the other misses both (memory too low at the
    longest length; a causal model too close to the bidirectional one); figures a seed lacks
    show '–'; cpu files are not demo runs."""
    _write_figure(tmp_path, "landmark_passkey", "quick", 5, {
        "train_context": 256, "accuracy": {
            "landmark_memory": {"256": 1.0, "1024": 0.9, "2048": 0.85},
            "landmark_full": {"256": 1.0, "1024": 0.0, "2048": 0.05}}})
    _write_figure(tmp_path, "landmark_passkey", "quick", 6, {
        "train_context": 256, "accuracy": {
            "landmark_memory": {"256": 1.0, "1024": 0.9, "2048": 0.75},
            "landmark_full": {"256": 1.0, "1024": 0.0, "2048": 0.0}}})
    for seed, causal in ((5, 0.4), (6, 0.9)):
        _write_figure(tmp_path, "birdie_recall", "quick", seed, {"accuracy": {
            "gated_ntp": {"2": 0.9, "6": causal}, "gated_bidir": {"2": 1.0, "6": 1.0}}})
    _write_figure(tmp_path, "lm_mqar", "cpu", 5, {"accuracy": 0.1, "no_binding": 0.125})
    lines = report.demo_table(tmp_path).splitlines()
    assert lines[0] == "| figure | bar | seed 5 | seed 6 |"
    passkey = next(line for line in lines if line.startswith("| `landmark_passkey`"))
    assert passkey.endswith("| memory 0.850, full attention 0.050 at 2048 (8×) **met** | "
                            "memory 0.750, full attention 0.000 at 2048 (8×) **not met** |")
    recall = next(line for line in lines if line.startswith("| `birdie_recall`"))
    assert "gated_bidir 1.000 − gated_ntp 0.400 = 0.600 at 6 pairs **met**" in recall
    assert "= 0.100 at 6 pairs **not met**" in recall
    mqar = next(line for line in lines if line.startswith("| `lm_mqar`"))
    assert mqar.endswith("| – | – |")
    assert lines[-1].startswith("From `results/figures/*-quick-seedS.json`")


def test_dryrun_table_from_the_dry_runs_files(tmp_path):
    (tmp_path / "dryrun").mkdir()
    doc = {"command": "python -m train.dryrun --config lm:paper --num_devices 4 "
                      "--config.mesh.fsdp=-1 --config.mesh.data=1 --config.seq_len=64",
           "commit": "abc1234", "num_devices": 4, "mesh": "data=1 × fsdp=4 × model=1",
           "params_bytes_total": 340798464, "params_bytes_per_device": 85199616,
           "optimizer_bytes_per_device": 170399240, "temp_bytes_per_device": 12_123_456_789,
           "total_bytes_per_device": 12_379_055_645, "fits": {"tpu_v4": True, "h200": False}}
    (tmp_path / "dryrun" / "lm-paper-4.json").write_text(json.dumps(doc))
    table = report.BUILDERS["dryrun"](tmp_path)
    assert ("| `lm:paper` (`seq_len=64`) | 4 (data=1×fsdp=4×model=1) | 0.341 GB | 0.085 GB | "
            "0.170 GB | 12.1 GB | 12.4 GB | tpu_v4 |") in table      # the mesh flags left out
    assert "(commit abc1234)" in table
    tpu = {**doc, "command": doc["command"].replace("--num_devices 4", "--topology v5e=2x2"),
           "device_kind": "TPU v5 lite", "fits": {"tpu_v5e": True}}
    (tmp_path / "dryrun" / "lm-paper-v5e-2x2.json").write_text(json.dumps(tpu))
    assert "| 4 TPU v5 lite (data=1×fsdp=4×model=1) |" in report.BUILDERS["dryrun"](tmp_path)
    (tmp_path / "dryrun" / "lm-paper-v5e-2x2.json").unlink()
    del doc["fits"]
    (tmp_path / "dryrun" / "lm-paper-4.json").write_text(json.dumps(doc))
    with pytest.raises(ValueError, match="lm-paper-4.json has no 'fits'"):
        report.BUILDERS["dryrun"](tmp_path)


def test_trainer_summary_names_the_attention_and_its_xla_baseline():
    d = {"shapes": {"width": 1024, "num_layers": 24, "seq_len": 2048, "compute_dtype": "bfloat16",
                    "devices_used": 1, "attention_used": "cudnn"},
         "device": {"device_kind": "NVIDIA H100 80GB HBM3"}, "tokens_per_s": 100_000.0,
         "mfu": 0.5, "model_flops_per_s": 4.0e14, "peak_flops_per_s_total": 8.0e14,
         "spec_peak_flops_per_s_total": 1.0e15, "n_params_total": 354_000_000,
         "step_with_xla_attention": {"speedup": 1.6, "tokens_per_s": 62_500.0}}
    text = report.trainer_summary(d)
    assert "; 1.60× the step with the XLA attention (62,500 tokens/s)" in text
    assert text.endswith("T 2048, bfloat16, cudnn attention)")
    # a file from before either field: as it was
    del d["step_with_xla_attention"], d["shapes"]["attention_used"]
    assert report.trainer_summary(d).endswith("T 2048, bfloat16)")
