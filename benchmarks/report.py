"""docs/results.md, the README's headline table and the decision records' evidence
tables, generated from benchmarks/results/.

    python benchmarks/report.py            # rewrite them (make results)
    python benchmarks/report.py --check    # exit 1, naming the file, when one is stale

Every figure in the generated text is read from a results JSON (benchmarks/results/
<benchmark>/<name>.json), and every row names its file, the machine and the commit that
measured it. A results file without the five provenance keys (benchmarks/record.py) stops
the report. Nothing here measures; the benchmarks do.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path
from typing import Any, Callable, Iterable

from record import PROVENANCE_KEYS

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"
PAGE = ROOT / "docs" / "results.md"
README = ROOT / "README.md"
DECISIONS = ROOT / "docs" / "decisions"

HELD_OUT = "quality/heldout.json"
"""The headline: the chosen configurations' test accuracy on seeds no choice read."""
CPU_PRESET = ["quality/cpu-preset-d4-overlap4.6-constant.json",
              "quality/cpu-preset-d4-overlap1-constant.json",
              "quality/cpu-preset-d4-overlap4.6-linear.json",
              "quality/cpu-preset-d4-overlap1-linear.json",
              "quality/cpu-preset-d3-overlap1-linear.json"]
"""The candidates the cpu preset was chosen from (docs/decisions/cpu-preset.md)."""
OPTION_WEIGHTS = ["quality/consistency-1-1.json", "quality/consistency-4-1.json",
                  "quality/consistency-4-1-cpu-preset.json",
                  "quality/gmvae-consistency-1-1.json", "quality/gmvae-consistency-50-50.json"]
"""The candidates the consistency option's weights were chosen from
(docs/decisions/consistency-weights.md)."""
GMVAE = "quality/gmvae-cpu-preset.json"
SELECTION = ["selection/digits.json", "selection/mnist.json", "selection/fashion-mnist.json"]
"""How well each label-free criterion picks trials (docs/decisions/label-free-objective.md)."""


class RecordError(ValueError):
    """A results file the report cannot use; the message names the file and the fix."""


def load(name: str) -> dict[str, Any]:
    path = RESULTS / name
    if not path.exists():
        raise RecordError(f"{path.relative_to(ROOT)} is missing: run the command in "
                          f"docs/benchmarks.md that writes it, or drop it from benchmarks/report.py.")
    data = json.loads(path.read_text())
    missing = [k for k in PROVENANCE_KEYS if k not in data]
    if missing:
        raise RecordError(f"{path.relative_to(ROOT)} lacks {missing}: every results file "
                          f"carries {list(PROVENANCE_KEYS)} (benchmarks/record.py provenance()).")
    data["_name"] = name
    return data


def machine(data: dict) -> str:
    m = data["machine"]
    cpu = m["processor"] if m["processor"] != "not recorded" else "CPU not recorded"
    if m.get("flags"):
        cpu += " (" + ", ".join(m["flags"]) + ")"
    return f"{m['gpu']}" if m.get("gpu") else cpu


def source(data: dict) -> str:
    """`file` link, machine, commit, date: the columns every row ends with. A merged file
    names the commits and dates of the runs it merged (its `sources`)."""
    parts = data.get("sources") or [data]
    commits = ", ".join(f"`{c}`" for c in sorted({p["commit"] for p in parts}))
    dates = ", ".join(sorted({p["date"] for p in parts}))
    return (f"[{data['_name']}](../benchmarks/results/{data['_name']}) | {machine(data)} | "
            f"{commits} | {dates}")


def table(header: list[str], rows: Iterable[list[Any]]) -> str:
    head = header + ["source", "machine", "commit", "date"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def mean_std(values: list[float]) -> str:
    if len(values) == 1:
        return f"{values[0]:.3f}"
    return f"{statistics.fmean(values):.3f} ± {statistics.stdev(values):.3f}"


def quality_rows(data: dict, describe: Callable[[dict], str]) -> list[list[Any]]:
    """One row per variant: settings, seeds, test and validation accuracy, modes."""
    rows = []
    for variant, runs in data["runs"].items():
        ordered = [runs[s] for s in sorted(runs, key=int)]
        budget = (f"{data['budget_minutes']:g} min" if data.get("budget_minutes")
                  else f"{data['budget_epochs']} epochs")
        val = [r["val/cluster_acc"] for r in ordered if "val/cluster_acc" in r]
        rows.append([variant, describe(ordered[0]["config"]), ",".join(sorted(runs, key=int)),
                     budget, mean_std([r["test/cluster_acc"] for r in ordered]),
                     mean_std(val) if val else "not recorded",
                     "/".join(f"{r['test/active_components']:.0f}" for r in ordered),
                     source(data)])
    return rows


def preset_settings(config: dict) -> str:
    m, t = config["model"], config["train"]
    return (f"d={m['latent_dim']}, overlap {100 * m['prior_overlap']:.1f}%, "
            f"{t['lr_schedule']} rate")


def option_settings(config: dict) -> str:
    m, t = config["model"], config["train"]
    return (f"{config['family']}, weights {t['consistency_weight']:g}/{t['balance_weight']:g}, "
            f"pretraining {t['pretrain_steps']}x{t['pretrain_batch']}, d={m['latent_dim']}, "
            f"overlap {100 * m['prior_overlap']:.1f}%")


QUALITY_HEADER = ["variant", "settings", "seeds", "budget", "test accuracy",
                  "val accuracy", "test modes per seed"]


def headline() -> str:
    held, gmvae = load(HELD_OUT), load(GMVAE)
    rows = quality_rows(held, option_settings) + quality_rows(gmvae, option_settings)
    kmeans = [held["kmeans"][s]["test/cluster_acc"] for s in sorted(held["kmeans"], key=int)]
    rows.append(["K-means on pixels", "K=10, scikit-learn, n_init=3",
                 ",".join(sorted(held["kmeans"], key=int)), "", mean_std(kmeans), "",
                 "", source(held)])
    return table(QUALITY_HEADER, rows)


def candidates(files: list[str], describe: Callable[[dict], str]) -> str:
    return table(QUALITY_HEADER, [r for f in files for r in quality_rows(load(f), describe)])


def selection_table(criteria: Iterable[str] | None = None) -> str:
    """Per dataset, family and criterion (all, or `criteria`): the Spearman correlation with
    test accuracy across the trials and the regret of its pick."""
    rows = []
    for name in SELECTION:
        data = load(name)
        s = data["settings"]
        for family, fam in data["summary"].items():
            for metric, c in fam["criteria"].items():
                if criteria is not None and metric not in criteria and not c["reads_labels"]:
                    continue
                rows.append([s["dataset"], f"{family} ({fam['finished']}/{fam['trials']})",
                             f"{metric}{' (labels)' if c['reads_labels'] else ''}",
                             f"{c['spearman']:.2f}", f"{c['picked_target']:.3f}",
                             f"{c['regret']:+.3f}", f"{c['regret_oracle']:.3f}", source(data)])
    return table(["dataset", "family (trials)", "criterion", "Spearman", "picked test acc",
                  "regret", "regret vs best"], rows)


def selection_chosen() -> str:
    from study.objective import LABEL_FREE_METRIC

    return selection_table([LABEL_FREE_METRIC])


def blocks() -> dict[Path, dict[str, Callable[[], str]]]:
    """The generated tables inside hand-written pages: {page: {block name: table}}. A page
    marks each block `<!-- results:NAME (make results) -->` ... `<!-- /results:NAME -->`;
    its links are written relative to the page."""
    return {README: {"headline": headline},
            DECISIONS / "cpu-preset.md": {
                "candidates": lambda: candidates(CPU_PRESET, preset_settings),
                "held-out": headline},
            DECISIONS / "consistency-weights.md": {
                "candidates": lambda: candidates(OPTION_WEIGHTS, option_settings),
                "held-out": headline},
            DECISIONS / "label-free-objective.md": {"criteria": selection_table,
                                                    "chosen": selection_chosen}}


def fill(path: Path, text: str, tables: dict[str, Callable[[], str]]) -> str:
    """`text` with each marked block replaced by its generated table."""
    relative = Path("../" * len(path.parent.relative_to(ROOT).parts))
    for name, make in tables.items():
        begin, end = f"<!-- results:{name} (make results) -->", f"<!-- /results:{name} -->"
        if begin not in text or end not in text:
            raise RecordError(f"{path.relative_to(ROOT)} lacks the markers {begin} ... {end} "
                              f"around its generated table; put them back where it goes.")
        head, rest = text.split(begin, 1)
        _, tail = rest.split(end, 1)
        body = make().replace("](../benchmarks/", f"]({relative.as_posix()}/benchmarks/"
                              if relative.parts else "](benchmarks/")
        text = f"{head}{begin}\n{body}\n{end}{tail}"
    return text


def sections() -> list[tuple[str, str, str]]:
    """(title, what it shows, the generated table) for docs/results.md."""
    gpu, cpu = load("gpu/h200-check.json"), load("throughput/cpu.json")
    overhead, static = load("overhead/local-ray.json"), load("cluster/static.json")
    autoscaling, dashboard = load("cluster/autoscaling.json"), load("dashboard/report.json")
    memory, kernel = load("memory/step-memory.json"), load("mmd_kernel/cpu.json")
    fit, driver = load("memory/gpu-fit.json"), load("driver/local-cluster.json")
    packing = load("packing/cpu.json")
    gpu_speed = gpu["speed"]["rows"] if isinstance(gpu["speed"], dict) else gpu["speed"]
    return [
        ("Clustering MNIST at the cpu preset (headline)",
         "Test Hungarian accuracy of the configurations the project ships, on seeds that no "
         "choice read (GM-WAE: seeds from 3 on, listed in the table; GM-VAE's preset is GM-WAE's, so its seeds 0-2 chose "
         "nothing), scored once on the whole 10,000-image test split. Validation accuracy is "
         "the last epoch's, on 2,000 validation images. Both accuracies read labels.",
         headline()),
        ("Choosing the cpu preset: the candidates",
         "The runs the cpu preset was chosen from (docs/decisions/cpu-preset.md): the paper's "
         "GM-WAE, 20 minutes of training each. The choice read these test figures, so they "
         "are biased upwards and are not results; the held-out rows above are.",
         candidates(CPU_PRESET, preset_settings)),
        ("Choosing the consistency option's weights: the candidates",
         "The runs the option's weights were chosen from (docs/decisions/consistency-weights.md), "
         "20 minutes each; as above, the choice read the test figures.",
         candidates(OPTION_WEIGHTS, option_settings)),
        ("Choosing models without labels (benchmarks/selection.py)",
         "Per family, trials of settings drawn at random (K, lambda, the overlap, d, the "
         "rate, the batch, the decoder and the options; the same number of steps each). Each "
         "label-free criterion, read on validation, against test Hungarian accuracy: "
         "Spearman's correlation across the trials (signed by the criterion's direction) and "
         "the regret of its pick: the test accuracy of the trial the labels pick (best "
         "val/cluster_acc, shown first, which reads labels) minus that of the criterion's pick; "
         "regret vs best: the best test accuracy minus the pick's. Targets for the chosen "
         "objective (docs/decisions/label-free-objective.md): Spearman at least 0.8, regret "
         "at most 0.02.",
         selection_table()),
        ("GPU: training step speed at the paper point (benchmarks/gpu_check.py)",
         "Optimiser steps per second at the paper preset (batch 128, K=10, S=5, width 128).",
         table(["family", "networks", "steps/s", "images/s", "GFLOP per step", "share of peak"],
               [[r["family"], r["mode"], f"{r['steps_per_s']:.1f}", f"{r['images_per_s']:.0f}",
                 f"{r['gflop_per_step']:.0f}" if "gflop_per_step" in r else "not measured",
                 (f"{r['fraction_of_peak']:.3f} of {r['peak']}" if r.get("fraction_of_peak")
                  else "not measured"), source(gpu)]
                for r in gpu_speed if "steps_per_s" in r])),
        ("GPU: memory estimate against the measured step (benchmarks/gpu_check.py)",
         "gmwae_core.memory's estimate of one step's memory against torch's peak allocation.",
         table(["configuration", "images per step", "estimated GiB", "measured GiB",
                "measured / estimated"],
               [[r["config"], r["images"], f"{r['estimated_step_gib']:.2f}",
                 f"{r['measured_step_gib']:.2f}", f"{r['measured/estimated']:.2f}", source(gpu)]
                for r in gpu["memory"]])),
        ("GPU: the memory estimate's constants, fitted to the measured reserve (benchmarks/memory_fit.py)",
         "The process's peak reserved CUDA memory in the rows above against the estimate of "
         "the allocator's reserve with the shipped constants (gmwae_core/memory.py: "
         + ", ".join(f"{k} {v:.3g}" for k, v in fit["shipped"].items()) + "; the least-squares "
         "fit gives " + ", ".join(f"{v:.3g}" for v in fit["fitted"].values()) + "). Target: "
         f"{fit['settings']['target'][0]} to {fit['settings']['target'][1]}. A trial's need "
         "is this reserve plus the CUDA context.",
         table(["configuration", "images per step", "reserved GiB", "estimated GiB",
                "reserved / estimated"],
               [[r["config"], r["images"], f"{r['reserved_gib']:.2f}",
                 f"{r['estimated_reserved_gib']:.2f}", f"{r['reserved/estimated']:.2f}",
                 source(fit)] for r in fit["rows"]])),
        ("CPU: training step throughput (benchmarks/throughput.py)",
         "One training step per variant (fp32 unless named), its FLOPs counted by torch "
         "(FlopCounterMode over one optimizer step), against the matmul peak of the step's "
         "precision measured in the same run.",
         table(["variant", "ms per step", "GFLOP per step", "GFLOP/s", "share of matmul peak"],
               [[r["preset"], f"{r['step_ms']:.1f}", f"{r['gflop_per_step']:.2f}",
                 f"{r['gflops']:.1f}", f"{r['fraction_of_matmul_peak']:.2f}", source(cpu)]
                for r in cpu["results"] if r.get("fraction_of_matmul_peak") is not None])),
        ("Trials sharing one device (benchmarks/packing.py)",
         "Aggregate optimiser steps per second of N GM-WAE trials at once on one device, as "
         "N processes or as one process stepping the N runs as a stack "
         "(gmwae_core.stacked), against one trial alone measured in the same run.",
         table(["size", "batch", "mode", "trials", "steps/s in all", "vs one alone"],
               [[r["size"], r["batch_size"], r["mode"], r["trials"],
                 f"{r['aggregate_steps_per_s']:.1f}", f"{r['vs_one_alone']:.2f}",
                 source(packing)] for r in packing["rows"] if "aggregate_steps_per_s" in r])),
        ("CPU: one step's memory, measured against the estimate (benchmarks/step_memory.py)",
         "Peak resident memory of one optimiser step against gmwae_core.memory's estimate.",
         table(["family", "width", "batch", "K", "S", "measured MiB", "estimated MiB", "ratio"],
               [[r["family"], r["width"], r["batch"], r["K"], r["S"],
                 f"{r['measured_bytes'] / 2**20:.0f}", f"{r['estimated_bytes'] / 2**20:.0f}",
                 f"{r['ratio']:.2f}", source(memory)] for r in memory["cpu_steps"]])),
        ("The MMD's kernel, eager against fused (benchmarks/mmd_kernel.py)",
         "Forward and backward of the IMQ-kernel MMD over all scales; the values and gradients "
         "agree to the listed differences.",
         table(["codes", "eager ms", "fused ms", "speed-up", "gradient difference"],
               [[r["codes"], f"{r['eager_ms']:.2f}", f"{r['fused_ms']:.2f}",
                 f"{r['speedup']:.2f}", f"{r['max_grad_diff']:.1e}", source(kernel)]
                for r in kernel["rows"]])),
        ("One driver at cluster scale (benchmarks/driver.py)",
         "Light trials (a report every " f"{driver['settings']['report_seconds']:g} s, "
         f"{driver['settings']['iterations']} reports each) through one study driver on a "
         "local cluster with the PostgreSQL and MLflow-server stores: the time from a "
         "trial's report to the driver's MLflow write of it returning, and trials finished "
         "per minute against the slots' ideal. Targets: p95 lag under "
         f"{driver['targets']['lag_p95_s_max']:g} s; throughput growing with the slots.",
         table(["slots", "trials", "lag p50 s", "lag p95 s", "lag max s", "trials / min",
                "ideal / min"],
               [[r["slots"], r["trials"], f"{r['lag_p50_s']:.2f}", f"{r['lag_p95_s']:.2f}",
                 f"{r['lag_max_s']:.2f}", f"{r['trials_per_minute']:.1f}",
                 f"{r['ideal_trials_per_minute']:.0f}", source(driver)]
                for r in driver["rows"]])),
        ("Platform overhead on one machine (benchmarks/overhead.py)",
         "The same trials run directly and through the platform (Ray Tune, Optuna, MLflow), "
         "and one against two at a time on two cores.",
         table(["measurement", "value", "target"],
               [["platform / direct wall time", f"{overhead['sequential']['ratio']:.2f}",
                 f"<= {overhead['sequential']['target_max']}", source(overhead)],
                ["two at a time: throughput / one at a time",
                 f"{overhead['concurrency']['throughput_ratio']:.2f}",
                 f">= {overhead['concurrency']['target_min']}", source(overhead)]])),
        ("Clusters on one machine (benchmarks/cluster.py)",
         "The smoke study on a static 3-node cluster against plain local Ray, and on the "
         "autoscaling cluster from zero workers, the families in turn and together.",
         table(["cluster", "measurement", "value"],
               [["static, 3 nodes", "wall time / local Ray", f"{static['ratio']:.2f}", source(static)]]
               + [[f"autoscaling, families {r['mode'].replace('_', ' ')}",
                   f"slot utilisation ({r['trials']} trials, {r['workers_launched']} workers "
                   f"launched and removed)", f"{r['utilisation']:.2f}", source(autoscaling)]
                  for r in autoscaling["runs"]])),
        ("The study report (benchmarks/dashboard.py)",
         "gmwae dashboard on a study of many trials: build time and page size.",
         table(["trials", "build seconds (median)", "size MB", "targets met"],
               [[dashboard["trials"], f"{dashboard['build_seconds_median']:.2f}",
                 f"{dashboard['size_mb']:.1f}",
                 "yes" if all(t["met"] for t in dashboard["targets"].values()) else "no",
                 source(dashboard)]])),
    ]


def check_record() -> None:
    """Every file of the record, quoted or not, carries the provenance keys."""
    for path in sorted(RESULTS.rglob("*.json")):
        load(path.relative_to(RESULTS).as_posix())


def results_page() -> str:
    parts = ["# Results",
             "",
             "Generated by `make results` (benchmarks/report.py) from the JSON files under "
             "benchmarks/results/; do not edit by hand. Each row names its file, the machine, "
             "the commit and the date of the measurement; the files also hold the command "
             "and its settings. How choices are made and reported: "
             "[concepts](concepts.md#choosing-on-validation-reporting-on-test).", ""]
    for title, text, body in sections():
        parts += [f"## {title}", "", text, "", body, ""]
    return "\n".join(parts)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--check", action="store_true",
                   help="write nothing; exit 1 when a generated page or table is stale")
    args = p.parse_args(argv)
    try:
        check_record()
        wanted = {PAGE: results_page() + "\n"}
        wanted.update({path: fill(path, path.read_text(), tables)
                       for path, tables in blocks().items()})
    except RecordError as e:
        print(f"benchmarks/report.py: {e}", file=sys.stderr)
        return 2
    stale = [path for path, text in wanted.items()
             if not path.exists() or path.read_text() != text]
    if args.check:
        for path in stale:
            print(f"{path.relative_to(ROOT)} is stale: run `make results`", file=sys.stderr)
        return 1 if stale else 0
    for path in stale:
        path.write_text(wanted[path])
        print(f"wrote {path.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
