"""The benchmarks' smoke modes, end to end: they run, print a table and write JSON."""
import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import LOCAL_CLUSTERS

ROOT = Path(__file__).parents[2]


def run(script, *args):
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / script), *map(str, args)],
                          capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout


def load_benchmark(script: str):
    """A benchmark script as a module, importing its siblings as it does when run
    (`python benchmarks/SCRIPT` puts benchmarks/ first on sys.path)."""
    import importlib

    folder = str(ROOT / "benchmarks")
    if folder not in sys.path:
        sys.path.insert(0, folder)
    return importlib.import_module(script.removesuffix(".py"))


def assert_provenance(result: dict, command: str) -> None:
    """The results record's five keys, as benchmarks/record.py writes them."""
    PROVENANCE_KEYS = load_benchmark("record.py").PROVENANCE_KEYS

    assert all(key in result for key in PROVENANCE_KEYS), set(PROVENANCE_KEYS) - set(result)
    assert len(result["date"]) == 10 and result["commit"] and command in result["command"]
    assert result["machine"]["processor"] and result["machine"]["cores"] >= 1


def test_quality_smoke_runs_variants_over_seeds_with_kmeans_and_merges(tmp_path):
    # --set applies after a variant's own settings: it can change the consistency weight.
    out = run("quality.py", "--smoke", "--variants", "paper,consistency-tuned,gmvae", "--seeds", "2",
              "--set", "train.consistency_weight=0.5",
              "--out", tmp_path / "a.json", "--runs", tmp_path / "runs")
    result = json.loads((tmp_path / "a.json").read_text())
    assert set(result["runs"]) == {"paper", "consistency-tuned", "gmvae"}
    assert all(set(runs) == {"0", "1"} for runs in result["runs"].values())
    train = result["runs"]["consistency-tuned"]["0"]["config"]["train"]
    assert train["consistency_weight"] == 0.5 and train["balance_weight"] == 1.0
    # the smoke's short pretraining goes over the variant's own (1,500 x 1,000 images)
    assert (train["pretrain_steps"], train["pretrain_batch"]) == (5, 64)
    assert result["runs"]["paper"]["1"]["config"]["train"]["seed"] == 1
    assert result["variants"]["consistency-tuned"]["train.consistency_weight"] == "0.5"
    for runs in [*result["runs"].values(), result["kmeans"]]:
        for r in runs.values():
            assert 0.0 < r["test/cluster_acc"] <= 1.0 and -1.0 <= r["test/ami"] <= 1.0
            assert r["test/cluster_acc_greedy"] <= r["test/cluster_acc"] + 1e-12
    # K-means on the synthetic bars separates them well: the anchor is a real measurement.
    assert result["summary"]["kmeans"]["cluster_acc"]["mean"] > 0.5
    paper = result["summary"]["paper"]["cluster_acc"]
    per_seed = [result["runs"]["paper"][s]["test/cluster_acc"] for s in ("0", "1")]
    assert paper["n"] == 2 and paper["mean"] == pytest.approx(sum(per_seed) / 2)
    assert paper["std"] == pytest.approx(abs(per_seed[0] - per_seed[1]) / 2 ** 0.5)
    # a target whose variant did not run is None, the others are measured
    assert result["targets"].pop("consistency_mean_ge_0.85") is None
    assert all(isinstance(v, bool) for v in result["targets"].values())
    assert "consistency-tuned_mean_ge_0.85" in result["targets"]
    assert "kmeans" in out and "± " in out and "seed 1:" in out
    # Provenance: the results record's five keys, the processor among them.
    from gmwae_core.training import cpu_has_fast_bf16
    assert result["date"] and result["commit"] and "quality.py --smoke" in result["command"]
    assert result["machine"]["processor"] and set(result["machine"]["flags"]) <= {
        "avx2", "avx512f", "avx512_bf16", "amx_bf16"}
    assert result["settings"]["seeds"] == [0, 1] and result["bf16_kernels"] is cpu_has_fast_bf16()
    assert {r["bf16_networks"] for runs in result["runs"].values() for r in runs.values()} == {0.0}
    # Each run keeps its validation metrics, the ones a choice between variants may read.
    assert all(0.0 <= r["val/cluster_acc"] <= 1.0 and r["val/mmd"] == r["val/mmd"]
               for runs in result["runs"].values() for r in runs.values())

    # seed 2 of one variant, measured later; the merge holds all runs and resummarises
    run("quality.py", "--smoke", "--variants", "paper", "--seed-list", "2",
        "--set", "train.consistency_weight=0.5",
        "--out", tmp_path / "b.json", "--runs", tmp_path / "runs")
    run("quality.py", "--merge", tmp_path / "a.json", tmp_path / "b.json", "--out", tmp_path / "m.json")
    merged = json.loads((tmp_path / "m.json").read_text())
    assert set(merged["runs"]["paper"]) == {"0", "1", "2"} and set(merged["kmeans"]) == {"0", "1", "2"}
    assert merged["summary"]["paper"]["cluster_acc"]["n"] == 3
    assert merged["runs"]["gmvae"] == result["runs"]["gmvae"]
    assert merged["settings"]["seeds"] == [0, 1, 2] and "--merge" in merged["command"]
    assert [s["file"] for s in merged["sources"]] == [str(tmp_path / "a.json"), str(tmp_path / "b.json")]


def test_quality_rejects_bad_variants_settings_and_merges_before_training(tmp_path):
    for args, message in ((["--variants", "paper,vae"], "--variants 'paper,vae'"),
                          (["--set", "decoder_width=0"], "model.decoder_width"),
                          (["--set", "train.seed=2"], "use --seed-list 2 instead"),
                          (["--seed-list", "a"], "--seed-list 'a'")):
        proc = subprocess.run([sys.executable, str(ROOT / "benchmarks/quality.py"), "--smoke",
                               *args, "--out", str(tmp_path / "q.json"), "--runs",
                               str(tmp_path / "runs")],
                              capture_output=True, text=True, timeout=600, cwd=ROOT)
        assert proc.returncode != 0 and message in proc.stderr, proc.stderr[-2000:]
        assert "Traceback" not in proc.stderr
    assert not (tmp_path / "q.json").exists() and not (tmp_path / "runs").exists()
    xeon = {"processor": "Intel Xeon", "flags": ["avx2", "avx512f"], "cores": 2}
    a = {"date": "2026-01-01", "commit": "abc1234", "command": "python benchmarks/quality.py",
         "machine": xeon, "settings": {"seeds": [0], "variants": ["consistency"]},
         "budget_minutes": 20, "preset": "cpu", "data": {"dataset": "mnist"}, "runs": {},
         "kmeans": {}, "variants": {}, "K": 10, "torch_threads": 2}
    (tmp_path / "a.json").write_text(json.dumps(a))
    (tmp_path / "b.json").write_text(json.dumps({**a, "budget_minutes": 5}))

    def merge():
        return subprocess.run([sys.executable, str(ROOT / "benchmarks/quality.py"), "--merge",
                               str(tmp_path / "a.json"), str(tmp_path / "b.json"), "--out",
                               str(tmp_path / "m.json")], capture_output=True, text=True, cwd=ROOT)

    proc = merge()
    assert proc.returncode != 0 and "budget_minutes=5" in proc.stderr
    assert not (tmp_path / "m.json").exists()
    # Same variant name and budget, but the preset changed between the files' commits.
    config = {"train": {"seed": 0, "pretrain_steps": 1500}, "data": {"data_dir": "/a"}}
    run_a = {"config": config, "test/cluster_acc": 0.8, "test/active_components": 10}
    run_b = {**run_a, "config": {"train": {"seed": 1, "pretrain_steps": 1000},
                                 "data": {"data_dir": "/b"}}}
    (tmp_path / "a.json").write_text(json.dumps({**a, "variants": {"consistency": {}},
                                                 "runs": {"consistency": {"0": run_a}}}))
    (tmp_path / "b.json").write_text(json.dumps({**a, "variants": {"consistency": {}},
                                                 "runs": {"consistency": {"1": run_b}}}))
    proc = merge()
    assert proc.returncode != 0 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    assert (f"variant 'consistency', seed 1 in {tmp_path / 'b.json'} trained with "
            f"train.pretrain_steps=1000 (1500 in {tmp_path / 'a.json'})") in proc.stderr
    assert "data_dir" not in proc.stderr and "train.seed" not in proc.stderr  # those may differ
    assert not (tmp_path / "m.json").exists()
    # Same runs' settings and time budget, but two processors (AVX2 against AVX-512).
    epyc = {"processor": "AMD EPYC", "flags": ["avx2"], "cores": 2}
    run_b["config"] = {**config, "train": {"seed": 1, "pretrain_steps": 1500}}
    scores = {"test/cluster_acc": 0.8, "test/nmi": 0.7, "test/ami": 0.7, "test/active_components": 10}

    def write(machine_b, **budget):
        for name, machine, seed, r in (("a", xeon, "0", run_a), ("b", machine_b, "1", run_b)):
            (tmp_path / f"{name}.json").write_text(json.dumps({
                **a, **budget, "machine": machine, "settings": {"seeds": [int(seed)],
                                                                "variants": ["consistency"]},
                "variants": {"consistency": {}}, "runs": {"consistency": {seed: {**r, **scores}}},
                "kmeans": {seed: scores}}))

    write(epyc)
    proc = merge()
    assert proc.returncode != 0 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    assert (f"{tmp_path / 'b.json'} ran on AMD EPYC (avx2), but {tmp_path / 'a.json'} on "
            f"Intel Xeon (avx2, avx512f)") in proc.stderr and "--epochs" in proc.stderr
    assert not (tmp_path / "m.json").exists()
    # A step budget makes the same steps on any processor: those runs merge.
    write(epyc, budget_minutes=None, budget_epochs=8)
    proc = merge()
    assert proc.returncode == 0, proc.stderr[-2000:]
    merged = json.loads((tmp_path / "m.json").read_text())
    assert set(merged["runs"]["consistency"]) == {"0", "1"} and merged["budget_epochs"] == 8
    assert [s["commit"] for s in merged["sources"]] == ["abc1234", "abc1234"]
    assert [s["machine"]["processor"] for s in merged["sources"]] == ["Intel Xeon", "AMD EPYC"]


def test_throughput_smoke_reports_flops_against_a_measured_peak(tmp_path):
    out = run("throughput.py", "--smoke", "--out", tmp_path / "t.json")
    result = json.loads((tmp_path / "t.json").read_text())
    assert result["matmul_peak_gflops"]["fp32"] > 1.0
    assert_provenance(result, "throughput.py --smoke")
    row = result["results"][0]
    assert row["preset"] == "cpu" and row["family"] == "gmwae" and row["precision"] == "fp32"
    assert row["steps_per_s"] > 0 and row["peak"] == "fp32"
    assert row["fraction_of_matmul_peak"] == row["gflops"] / result["matmul_peak_gflops"]["fp32"]
    assert abs(sum(row["profile_share"].values()) - 1.0) < 1e-6
    assert row["profile_share"]["decoder"] > 0 and row["profile_share"]["mmd"] > 0
    assert set(row["component_ms"]) == {"encoders", "decoder", "mmd", "optimizer"}
    # the cpu preset's three decoder convolutions: 64 -> 32 -> 16 -> 1 channels
    assert [x["layer"].split(",")[0] for x in row["decoder_layers"]] == [
        "64->32 ch", "32->16 ch", "16->1 ch"]
    assert all(x["gflops"] > 0 for x in row["decoder_layers"])
    assert "of peak" in out and "decoder convolutions alone" in out


def test_a_step_counts_three_times_its_forward_flops():
    """benchmarks/flops.py counts a whole optimizer step: the backward of the convolutions
    and matmuls is twice their forward, so a step is about three forwards."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    from gmwae_core import Trainer, from_preset, load_splits

    flops = load_benchmark("flops.py")
    for family in ("gmwae", "gmvae"):
        cfg = from_preset("cpu", {"dataset": "synthetic", "pretrain_steps": 0,
                                  "decoder_width": 16, "precision": "fp32"}, family=family)
        trainer = Trainer(cfg, load_splits(cfg.data))
        with FlopCounterMode(display=False) as forward, torch.no_grad():
            trainer._loss(trainer._next_batch())
        step = flops.step_flops(trainer)
        assert 2.9 < step / forward.get_total_flops() < 3.1, (family, step, forward.get_total_flops())
    assert flops.peak_key("bf16", torch.device("cuda")) == "bf16"
    assert flops.peak_key("fp32", torch.device("cuda")) == "tf32"
    assert flops.peak_key("fp32", torch.device("cpu")) == "fp32"


def test_packing_smoke_measures_processes_and_a_stack_against_one_trial(tmp_path):
    out = run("packing.py", "--smoke", "--sizes", "quickstart", "--out", tmp_path / "p.json")
    result = json.loads((tmp_path / "p.json").read_text())
    assert_provenance(result, "packing.py --smoke")
    rows = {(r["mode"], r["trials"]): r for r in result["rows"]}
    assert set(rows) == {("processes", 1), ("processes", 2), ("stacked", 1), ("stacked", 2)}
    assert rows["processes", 1]["vs_one_alone"] == 1.0
    for r in rows.values():
        assert r["aggregate_steps_per_s"] > 0 and r["batch_size"] == 16
        assert r["per_trial_steps_per_s"] == r["aggregate_steps_per_s"] / r["trials"]
        assert r["vs_one_alone"] == r["aggregate_steps_per_s"] / rows["processes", 1][
            "aggregate_steps_per_s"]
    assert "steps/s in all" in out and "stacked" in out


def test_packing_rejects_bad_counts_and_sizes_before_measuring(tmp_path):
    for args, message in ((["--counts", "1,x"], "--counts must be comma-separated whole numbers"),
                          (["--counts", "0"], "a count below 1"),
                          (["--sizes", "huge"], "unknown size or mode ['huge']")):
        proc = subprocess.run([sys.executable, str(ROOT / "benchmarks/packing.py"), *args,
                               "--out", tmp_path / "p.json"],
                              capture_output=True, text=True, timeout=300, cwd=ROOT)
        assert proc.returncode == 2 and message in proc.stderr, proc.stderr[-2000:]
        assert not (tmp_path / "p.json").exists()


def test_throughput_rejects_an_unknown_variant(tmp_path):
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks/throughput.py"), "--presets",
                           "cpu+fast", "--out", tmp_path / "t.json"],
                          capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert proc.returncode != 0 and "unknown variant 'cpu+fast'" in proc.stderr
    assert not (tmp_path / "t.json").exists()


def test_throughput_variants_combine_width_and_compile():
    import pytest
    import torch

    throughput = load_benchmark("throughput.py")
    cfg = throughput.variant_config("cpu+w64+compile", torch.device("cpu"))
    assert cfg.model.decoder_width == 64 and cfg.train.compile
    assert throughput.variant_config("cpu+gmvae", torch.device("cpu")).family == "gmvae"
    cfg = throughput.variant_config("cpu+w16", torch.device("cpu"))
    assert cfg.model.decoder_width == 16 and not cfg.train.compile
    assert cfg.train.precision == "fp32"
    assert throughput.variant_config("cpu+bf16", torch.device("cpu")).train.precision == "bf16"
    with pytest.raises(SystemExit, match="part 'w6x'"):
        throughput.variant_config("cpu+compile+w6x", torch.device("cpu"))


def test_overhead_smoke_times_the_platform_against_direct_calls(tmp_path):
    out = run("overhead.py", "--smoke", "--out", tmp_path / "o.json")
    result = json.loads((tmp_path / "o.json").read_text())
    assert_provenance(result, "overhead.py --smoke")
    seq, conc = result["sequential"], result["concurrency"]
    assert seq["direct_seconds"] > 0 and seq["platform_seconds"] > 0
    assert seq["ratio"] == seq["platform_seconds"] / seq["direct_seconds"]
    assert conc["throughput_ratio"] == conc["one_at_a_time_seconds"] / conc["two_at_a_time_seconds"]
    # the trials' span (MLflow child runs' start/end) is inside the study's wall time
    assert 0 < conc["one_at_a_time_trial_span_seconds"] < conc["one_at_a_time_seconds"]
    assert 0 < conc["two_at_a_time_trial_span_seconds"] < conc["two_at_a_time_seconds"]
    assert "2 at a time" in out and "trials only" in out


def test_dashboard_smoke_times_a_report_from_real_stores(tmp_path):
    out = run("dashboard.py", "--smoke", "--out", tmp_path / "d.json")
    result = json.loads((tmp_path / "d.json").read_text())
    assert_provenance(result, "dashboard.py --smoke")
    assert result["trials"] == 20 and len(result["build_seconds"]) == 1
    assert 0 < result["build_seconds_median"] and 1.0 < result["size_mb"]  # plotly.js is inline
    assert result["targets"]["size"]["met"] == (result["size_mb"] < 15.0)
    assert "build s (median)" in out


def test_dashboard_benchmark_draws_each_familys_params_from_the_specs_space(tmp_path):
    import optuna

    bench = load_benchmark("dashboard.py")
    study_spec = bench.write_study(tmp_path, trials=6, steps=10)
    space = study_spec.search_space
    for family in study_spec.families:
        trials = optuna.load_study(study_name=f"bench/{family}",
                                   storage=f"sqlite:///{tmp_path}/optuna.db").trials
        assert len(trials) == 3
        for t in trials:  # GM-VAE has no lambda_mmd: the space says so, not the benchmark
            assert set(t.params) == {p.name for p in space.of(family)}
            assert all(p.allows(t.params[p.name]) for p in space.of(family))


@LOCAL_CLUSTERS
@pytest.mark.slow
def test_cluster_smoke_measures_both_family_modes_on_an_autoscaling_cluster(tmp_path):
    out = run("cluster.py", "--smoke", "--out", tmp_path / "c.json")
    result = json.loads((tmp_path / "c.json").read_text())
    assert [r["mode"] for r in result["runs"]] == ["in_turn", "together"]
    for r in result["runs"]:
        assert r["trials"] == 4  # 2 per family, every one ran
        assert 0 < r["submit_to_first_trial_s"] < r["submit_to_end_s"]
        assert 0 < r["utilisation"] <= 1.0 + 1e-9
        assert r["workers_launched"] >= 1 and r["workers_removed"] == r["workers_launched"]
    assert "utilisation" in out and "together" in out


def test_step_memory_smoke_measures_a_step_within_the_estimate(tmp_path):
    out = run("step_memory.py", "--smoke", "--out", tmp_path / "m.json")
    result = json.loads((tmp_path / "m.json").read_text())
    assert_provenance(result, "step_memory.py --smoke")
    assert {r["family"] for r in result["cpu_steps"]} == {"gmwae", "gmvae"}
    for r in result["cpu_steps"]:
        assert r["measured_bytes"] > 100 * 2**20  # a real step's peak, not noise
        assert 0.7 < r["ratio"] < 1.3, r
    assert {r["config"] for r in result["gpu_estimates"]} >= {"paper point (paper preset)"}
    assert "measured MiB" in out and "GPU estimate" in out


def test_gpu_check_smoke_runs_every_section_on_the_cpu(tmp_path):
    """The GPU check's sections run end to end (CPU, tiny shapes)."""
    out = run("gpu_check.py", "--smoke", "--out", tmp_path / "g.json", "--sections",
              "memory,syncs,speed,training,paper,kernel,packing", "--packing-sizes", "quickstart",
              "--packing-counts", "1")
    result = json.loads((tmp_path / "g.json").read_text())
    for section in ("memory", "syncs", "training", "paper", "kernel", "packing"):
        assert isinstance(result[section], list) and result[section], (section, result[section])
    assert {r["family"] for r in result["training"]} == {"gmwae", "gmvae"}
    assert all(r["epochs"] and 0 <= r["test"]["test/cluster_acc"] <= 1 for r in result["training"])
    speed = result["speed"]
    assert speed["matmul_peak_gflops"]["fp32"] > 1.0
    for r in speed["rows"]:
        if r["mode"] == "fp32":  # FLOPs counted, and the rate against the fp32 peak
            assert r["steps_per_s"] > 0 and r["gflop_per_step"] > 0 and r["peak"] == "fp32"
            assert r["fraction_of_peak"] == pytest.approx(
                1e3 * r["tflops"] / speed["matmul_peak_gflops"]["fp32"])
    assert {(r["mode"], r["trials"]) for r in result["packing"]} == {("processes", 1),
                                                                     ("stacked", 1)}
    assert "GFLOP/step" in out and "steps/s in all" in out
    assert [r["variant"] for r in result["paper"]] == ["paper", "consistency"]
    for r in result["paper"]:
        assert r["epochs"] and all(0 <= e["paper/cluster_acc_greedy"] <= 1 for e in r["epochs"])
        assert r["n_held"] == 300  # the synthetic set pools 3,000 images: a tenth held out
    assert all(r["max_grad_diff"] < 1e-5 for r in result["kernel"])
    assert "est step GiB" in out and "IMQ kernel, 160 codes" in out
    assert_provenance(result, "gpu_check.py --smoke")
    assert result["machine"]["gpu"] is None and result["settings"]["smoke"] is True


def test_gpu_check_set_changes_a_variants_setting_and_a_bad_key_stops_before_any_run(tmp_path):
    """--set applies after the paper section's variant settings and is recorded under its
    full key; an unknown key exits 2 naming it, before any section runs or writes."""
    run("gpu_check.py", "--smoke", "--sections", "paper", "--paper-variants", "consistency",
        "--set", "consistency_weight=4", "--out", tmp_path / "g.json")
    result = json.loads((tmp_path / "g.json").read_text())
    assert result["paper"][0]["settings"] == {"train.consistency_weight": "4",
                                              "train.balance_weight": 1.0}
    assert result["command"].endswith(f"consistency_weight=4 --out {tmp_path / 'g.json'}")
    assert result["settings"]["overrides"] == {"consistency_weight": "4"}
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "gpu_check.py"), "--smoke",
                           "--set", "train.consistency_wieght=4", "--out", str(tmp_path / "bad.json")],
                          capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert proc.returncode == 2 and "train.consistency_wieght" in proc.stderr, proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr and not (tmp_path / "bad.json").exists()


def test_mmd_kernel_smoke_times_eager_and_fused_and_they_agree(tmp_path):
    out = run("mmd_kernel.py", "--smoke", "--out", tmp_path / "k.json")
    result = json.loads((tmp_path / "k.json").read_text())
    (row,) = result["rows"]
    assert_provenance(result, "mmd_kernel.py --smoke")
    assert row["codes"] == 160 and row["eager_ms"] > 0 and row["fused_ms"] > 0
    assert row["max_value_diff"] < 1e-5 and row["max_grad_diff"] < 1e-5
    assert "speed-up" in out and f"{row['speedup']:.2f}" in out


def test_mmd_kernel_rejects_sizes_that_are_not_integers(tmp_path):
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks/mmd_kernel.py"), "--sizes", "640,big",
                           "--out", str(tmp_path / "k.json")], capture_output=True, text=True, cwd=ROOT)
    assert proc.returncode == 2 and "--sizes must be comma-separated integers" in proc.stderr
    assert not (tmp_path / "k.json").exists()


def test_memory_fit_recovers_the_constants_a_record_was_made_with_and_needs_gpu_rows(tmp_path):
    """A gpu_check-shaped record whose reserved memory follows known constants: the fit
    gives them back, and each row is printed against the shipped estimate."""
    gpu_check = load_benchmark("gpu_check.py")
    memory_fit = load_benchmark("memory_fit.py")
    blocks, passes, base = 6.0, 2.0, 0.25 * 2 ** 30
    rows = []
    for label, family, _ in gpu_check.MEMORY:
        cfg = memory_fit.configs()[label]
        images = cfg.train.batch_size * cfg.model.K * cfg.model.num_samples
        reserved = (blocks * 4 * images ** 2 * (family == "gmwae")
                    + passes * 4 * images * (686 * cfg.model.decoder_width + 2352) + base)
        rows.append({"config": label, "family": family, "images": images,
                     "reserved_gib": reserved / 2 ** 30})
    record = tmp_path / "gpu.json"
    record.write_text(json.dumps({"machine": {"gpu": "made up"}, "memory": rows}))
    out = tmp_path / "fit.json"
    printed = run("memory_fit.py", "--record", record, "--out", out)
    result = json.loads(out.read_text())
    assert_provenance(result, "benchmarks/memory_fit.py")
    assert result["fitted"] == pytest.approx({"GPU_MMD_BLOCKS": blocks, "GPU_DECODER_SAVED": passes,
                                              "GPU_BASE_BYTES": base}, rel=1e-6)
    assert [r["config"] for r in result["rows"]] == [r["config"] for r in rows]
    assert "reserved GiB" in printed and "GPU_MMD_BLOCKS" in printed

    record.write_text(json.dumps({"machine": {}, "memory": [
        {k: v for k, v in r.items() if k != "reserved_gib"} for r in rows]}))  # a CPU run
    done = subprocess.run([sys.executable, str(ROOT / "benchmarks/memory_fit.py"), "--record",
                           str(record), "--out", str(tmp_path / "none.json")],
                          capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert done.returncode == 2 and "holds 0 memory rows measured on a GPU" in done.stderr
    assert not (tmp_path / "none.json").exists()


@LOCAL_CLUSTERS
@pytest.mark.slow  # a local cluster with PostgreSQL and an MLflow server, two studies
def test_driver_smoke_measures_report_to_mlflow_lag_and_throughput_per_slot_count(tmp_path):
    out = tmp_path / "driver.json"
    printed = run("driver.py", "--smoke", "--out", out)
    result = json.loads(out.read_text())
    assert_provenance(result, "benchmarks/driver.py")
    assert [r["slots"] for r in result["rows"]] == [2, 4]
    for row in result["rows"]:
        assert row["trials"] == 2 * row["slots"] and row["reports"] == 3 * row["trials"]
        assert 0 < row["lag_p50_s"] <= row["lag_p95_s"] <= row["lag_max_s"]
        assert row["trials_per_minute"] > 0
    assert "lag p50 s" in printed


def test_driver_rejects_slots_that_are_not_positive_integers(tmp_path):
    for bad in ("4,x", "0"):
        done = subprocess.run([sys.executable, str(ROOT / "benchmarks/driver.py"), "--slots",
                               bad, "--out", str(tmp_path / "d.json")],
                              capture_output=True, text=True, timeout=120, cwd=ROOT)
        assert done.returncode == 2 and "--slots must be" in done.stderr
        assert not (tmp_path / "d.json").exists()


def test_selection_smoke_scores_every_label_free_criterion_against_test_accuracy(tmp_path):
    out = run("selection.py", "--smoke", "--out", tmp_path / "s.json")
    result = json.loads((tmp_path / "s.json").read_text())
    assert_provenance(result, "selection.py")
    selection = load_benchmark("selection.py")
    from gmwae_core.metrics import EVAL_METRICS, LABEL_METRICS

    assert set(selection.CRITERIA) == {f"val/{m}" for m in EVAL_METRICS if m not in LABEL_METRICS}
    assert {t["family"] for t in result["trials"]} == {"gmwae", "gmvae"}
    for family, fam in result["summary"].items():
        trials = [t for t in result["trials"] if t["family"] == family and "metrics" in t]
        assert fam["finished"] == len(trials) >= 2
        accs = [t["metrics"]["test/cluster_acc"] for t in trials]
        labelled = max(trials, key=lambda t: t["metrics"]["val/cluster_acc"])
        for metric, c in fam["criteria"].items():
            # the regret is recomputed here from the trials the file keeps
            sign = 1 if EVAL_METRICS[metric.split("/")[1]] == "max" else -1
            pick = max(trials, key=lambda t: sign * t["metrics"][metric])
            assert c["picked_target"] == pick["metrics"]["test/cluster_acc"]
            assert c["regret"] == labelled["metrics"]["test/cluster_acc"] - c["picked_target"]
            assert c["regret_oracle"] == max(accs) - c["picked_target"] >= 0
            assert c["reads_labels"] == (metric == "val/cluster_acc")
        assert fam["criteria"]["val/cluster_acc"]["regret"] == 0
    assert "regret" in out and "val/augment_mi" in out


def test_selection_refuses_a_target_that_is_not_a_labelled_test_metric(tmp_path):
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "selection.py"), "--smoke",
                           "--target", "val/cluster_acc", "--out", tmp_path / "s.json"],
                          capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert proc.returncode == 2 and "--target must be a test metric" in proc.stderr
    assert not (tmp_path / "s.json").exists()


def test_reproduce_goes_on_across_windows_exactly_where_it_stopped(tmp_path):
    """The paper reproduction in two windows (the first too short to finish, however far it
    gets) ends where one uninterrupted window does: the runs' states are saved and resumed
    exactly, and the record gathers both windows."""
    common = ["--smoke", "--epochs", "2", "--seeds", "0,1", "--variants", "paper,gmvae"]
    run("reproduce.py", *common, "--state", tmp_path / "s2", "--window-seconds", "4",
        "--out", tmp_path / "two.json")
    first = json.loads((tmp_path / "two.json").read_text())
    assert first["complete"] is False or first["windows"][0]["steps"] > 0
    out = run("reproduce.py", *common, "--state", tmp_path / "s2", "--window-seconds", "600",
              "--out", tmp_path / "two.json")
    two = json.loads((tmp_path / "two.json").read_text())
    run("reproduce.py", *common, "--state", tmp_path / "s1", "--window-seconds", "600",
        "--out", tmp_path / "one.json")
    one = json.loads((tmp_path / "one.json").read_text())
    assert two["complete"] and one["complete"] and "complete; wrote" in out
    assert len(two["windows"]) == len(two["sources"]) == 2 and len(one["windows"]) == 1
    assert_provenance(two, "reproduce.py --smoke")
    for variant in ("paper", "gmvae"):
        assert two["variants"][variant]["finished_seeds"] == 2
        for seed in ("0", "1"):
            a, b = two["variants"][variant]["runs"][seed], one["variants"][variant]["runs"][seed]
            assert a["steps"] == a["of_steps"] == b["steps"] and a["epochs_done"] == 2.0
            assert a["paper"] == b["paper"], (variant, seed)  # the same run, bit for bit
        values = [r["paper"]["paper/cluster_acc_greedy"]
                  for r in two["variants"][variant]["runs"].values()]
        assert two["variants"][variant]["cluster_acc_greedy_mean"] == pytest.approx(
            sum(values) / 2)


def test_reproduce_rejects_bad_variants_seeds_and_a_changed_schedule(tmp_path):
    def call(*args):
        return subprocess.run([sys.executable, str(ROOT / "benchmarks/reproduce.py"), "--smoke",
                               "--state", str(tmp_path / "s"), *map(str, args)],
                              capture_output=True, text=True, timeout=300, cwd=ROOT)

    for args, message in ((["--variants", "papr"], "unknown variant ['papr']"),
                          (["--seeds", "0,one"], "--seeds must be comma-separated whole numbers"),
                          (["--epochs", "0"], "train.epochs")):
        proc = call("--epochs", "2", *args, "--out", tmp_path / "r.json")
        assert proc.returncode == 2 and message in proc.stderr, proc.stderr[-2000:]
        assert not (tmp_path / "r.json").exists()
    assert call("--epochs", "1", "--seeds", "0", "--variants", "gmvae", "--window-seconds",
                "600", "--out", tmp_path / "r.json").returncode == 0
    before = (tmp_path / "r.json").read_text()
    proc = call("--epochs", "3", "--seeds", "0", "--variants", "gmvae", "--out", tmp_path / "r.json")
    assert proc.returncode == 2 and "holds runs of 1 epochs, not 3" in proc.stderr
    assert (tmp_path / "r.json").read_text() == before  # nothing recorded is lost
