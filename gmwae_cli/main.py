"""The `gmwae` command.

    gmwae train --family gmwae --preset cpu --dataset digits --epochs 5 --out runs/digits-wae
    gmwae train --family gmwae --preset cpu --dataset mnist --data-dir ../shared/data/mnist \\
                --minutes 20 --out runs/mnist-wae
    gmwae train --family gmvae --preset cpu --dataset mnist --init-from runs/mnist-wae/checkpoint \\
                --epochs 2 --out runs/vae-from-wae          # paper Fig. 4
    gmwae evaluate runs/mnist-wae/checkpoint --check
    gmwae train --smoke --out /tmp/smoke                    # seconds, no files needed
    gmwae study run studies/smoke.yaml                      # a whole study, local Ray, sqlite stores
    gmwae study status smoke                                # its trials so far, from the stores
    gmwae study resume smoke                                # after the driver died (kill -9 too)
    gmwae study export smoke --top 2 --out exports/smoke    # best checkpoints + model registry
    gmwae study confirm smoke --seeds 5                     # best configs again, new seeds
    gmwae dashboard smoke                                   # runs/smoke/report.html (Plotly, offline)

User errors (bad config, data, checkpoint) print one line and exit with status 2.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Optional, Sequence

from gmwae_core.config import DATASETS, FAMILIES

__all__ = ["main"]

EXIT_USER_ERROR = 2
EXIT_TRAINING_FAILED = 1


def _add_train(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("train", help="train one GM-WAE or GM-VAE and write metrics, figures, "
                                     "checkpoint")
    p.add_argument("--family", choices=list(FAMILIES), default=FAMILIES[0])
    p.add_argument("--preset", choices=["paper", "cpu"], default="cpu",
                   help="paper: Section 3 of the paper (GPU); cpu: narrower decoder, S=1 (default)")
    p.add_argument("--dataset", choices=list(DATASETS),
                   default=None, help="default: mnist")
    p.add_argument("--data-dir", default=None,
                   help="folder with the four IDX files (default: $GMWAE_DATA_DIR, then "
                        "download); for --dataset images, your images' folder or .npy file")
    budget = p.add_mutually_exclusive_group()
    budget.add_argument("--epochs", type=int, default=None, help="epochs to train")
    budget.add_argument("--minutes", type=float, default=None,
                        help="wall-clock training budget in minutes instead of a number of epochs")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config value, e.g. --set model.K=12 --set lr=1e-3")
    p.add_argument("--init-from", default=None, metavar="CHECKPOINT_DIR",
                   help="start from another run's weights (e.g. a GM-VAE from a GM-WAE)")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--smoke", action="store_true",
                   help="a seconds-long run on the synthetic set (for tests and a first look)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")


def _add_evaluate(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("evaluate", help="recompute the test metrics of a saved checkpoint")
    p.add_argument("checkpoint", help="a checkpoint folder (OUT/checkpoint of a run, or an export)")
    p.add_argument("--dataset", choices=list(DATASETS),
                   default=None, help="default: the checkpoint's dataset")
    p.add_argument("--data-dir", default=None)
    p.add_argument("--protocol", choices=["standard", "paper"], default=None,
                   help="paper: train and test pooled, the last 1,000 held out as the test "
                        "split, and paper/ metrics (the greedy map fitted on the training "
                        "images); default: the checkpoint's")
    p.add_argument("--json", dest="json_out", default=None, help="also write the metrics here")
    p.add_argument("--assignments", default=None,
                   help="write each test image's cluster here (CSV: index,cluster,label)")
    p.add_argument("--check", action="store_true",
                   help="exit 1 unless every saved test metric is reproduced exactly")


def _add_study(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("study", help="hyperparameter studies over both families (Ray Tune, "
                                     "Optuna, MLflow)")
    study_sub = p.add_subparsers(dest="study_command", required=True)
    run = study_sub.add_parser("run", help="run a study spec (YAML) to its trial budget")
    run.add_argument("spec", help="a study spec, e.g. studies/quickstart.yaml")
    run.add_argument("--trials", type=int, default=None, help="trials per family (overrides the spec)")
    run.add_argument("--address", default=None,
                     help="Ray cluster address, HOST:PORT or auto (default: the job's cluster "
                          "under `ray job submit`, else a new Ray on this machine)")
    run.add_argument("--smoke", action="store_true",
                     help="2 trials per family, 1 iteration of 20 steps, synthetic data")
    run.add_argument("--quiet", action="store_true", help="no Tune progress table")
    run.add_argument("--name", default=None, help="study name (overrides the spec's; a new name "
                                                  "starts a new study with its own stores)")
    run.add_argument("--resume", action="store_true",
                     help="continue the study of this name if its stores hold trials")
    run.add_argument("--set", dest="sets", action="append", default=[], metavar="KEY=VALUE",
                     help="change a spec value without editing the file, e.g. --set "
                          "storage.ray=s3://bucket/ray --set resources.gpu=0.25 (repeatable)")
    resume = study_sub.add_parser("resume", help="continue a study after its driver stopped "
                                                 "(kill -9 included) until each family has its trials")
    resume.add_argument("study", help="a study name (studies/NAME.yaml, else the default stores "
                                      "under runs/NAME) or the spec file it ran with")
    resume.add_argument("--trials", type=int, default=None,
                        help="trials per family (default: as recorded when the study started)")
    resume.add_argument("--address", default=None, help="Ray cluster address")
    resume.add_argument("--quiet", action="store_true", help="no Tune progress table")
    resume.add_argument("--set", dest="sets", action="append", default=[], metavar="KEY=VALUE",
                        help="change a resumable spec value (stores, resources, trials, ...)")
    export = study_sub.add_parser("export", help="the top trials' best checkpoints -> a folder "
                                                 "and the MLflow Model Registry (no training)")
    export.add_argument("study", help="a study name or the spec file it ran with")
    export.add_argument("--top", type=int, default=1, help="trials per family (default 1)")
    export.add_argument("--family", choices=list(FAMILIES), action="append", default=None,
                        help="only this family (repeatable; default: the study's families)")
    export.add_argument("--out", required=True, help="a new (or empty) folder")
    export.add_argument("--registry-uri", default=None,
                        help="MLflow Model Registry URI (default: the study's MLflow store)")
    confirm = study_sub.add_parser("confirm", help="re-train each family's best configuration "
                                                   "with new seeds; test metrics as mean +- std")
    confirm.add_argument("study", help="a study name or the spec file it ran with")
    confirm.add_argument("--seeds", type=int, default=5, help="new seeds per family (default 5)")
    confirm.add_argument("--out", default=None,
                         help="folder for confirm.md and confirm.json (default runs/NAME/confirm)")
    confirm.add_argument("--address", default=None, help="Ray cluster address")
    confirm.add_argument("--quiet", action="store_true", help="no Tune progress table")
    validate = study_sub.add_parser("validate", help="read a spec and print what it would run: "
                                                     "the objective, each family's searched "
                                                     "parameters, the fixed values; runs nothing")
    validate.add_argument("spec", help="a study spec, e.g. studies/quickstart.yaml")
    validate.add_argument("--set", dest="sets", action="append", default=[], metavar="KEY=VALUE",
                          help="change a spec value, as for `study run`")
    status = study_sub.add_parser("status", help="trials so far, from the study's stores "
                                                 "(while it runs or after)")
    status.add_argument("study", help="a spec file, or a study name (studies/NAME.yaml, else "
                                      "the default stores under runs/NAME)")


def _add_dashboard(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("dashboard", help="one self-contained HTML report comparing the families "
                                         "of a study (Plotly, opens offline)")
    p.add_argument("study", help="a study name or the spec file it ran with")
    p.add_argument("--out", default=None, help="HTML file (default runs/NAME/report.html)")
    p.add_argument("--mlflow-url", default=None,
                   help="address of an MLflow UI for links to the runs (default: the tracking "
                        "server when the study uses one)")
    p.add_argument("--no-log", action="store_true",
                   help="do not log the report to the study's parent MLflow run")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="gmwae", description=__doc__.split("\n")[0] or None,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    _add_train(sub)
    _add_evaluate(sub)
    _add_study(sub)
    _add_dashboard(sub)
    return parser


class _Bar:
    """tqdm progress for gmwae_core.Progress: steps, then val accuracy per epoch."""

    def __init__(self, quiet: bool):
        self.quiet, self.bar = quiet, None

    def start(self, total_steps: int, budget_seconds: Optional[float]) -> None:
        if self.quiet:
            return
        from tqdm import tqdm

        desc = f"train (budget {budget_seconds / 60:g} min)" if budget_seconds else "train"
        self.bar = tqdm(total=None if budget_seconds else total_steps, desc=desc, unit="step",
                        mininterval=1.0, file=sys.stderr)

    def step(self, step: int) -> None:
        if self.bar is not None:
            self.bar.update(1)

    def epoch(self, epoch: int, row: dict) -> None:
        if self.bar is not None:
            shown = ({"val_acc": f"{row['val/cluster_acc']:.3f}"} if "val/cluster_acc" in row
                     else {"augment_mi": f"{row['val/augment_mi']:.3f}"})  # images without labels
            self.bar.set_postfix(epoch=epoch, **shown, active=int(row["val/active_components"]))

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def _train(args: argparse.Namespace) -> int:
    from gmwae_core import Progress, from_preset, parse_overrides, train_run

    overrides: dict = {}
    if args.smoke:
        overrides.update({"dataset": "synthetic", "epochs": 1, "decoder_width": 8,
                          "batch_size": 32, "pretrain_steps": 5})
    if args.dataset:
        overrides["dataset"] = args.dataset
    if args.data_dir:
        overrides["data_dir"] = args.data_dir
    if args.epochs is not None:
        overrides["epochs"] = args.epochs
    if args.minutes is not None:
        overrides.update({"minutes": args.minutes, "epochs": 1_000_000})
    overrides.update(parse_overrides(args.overrides))
    cfg = from_preset(args.preset, overrides, family=args.family)

    class Bar(_Bar, Progress):
        pass

    metrics = train_run(cfg, args.out, init_from=args.init_from, progress=Bar(args.quiet))
    _print_summary(metrics, Path(args.out))
    return 0


def _print_summary(metrics: dict, out: Path) -> None:
    keys = ["cluster_acc", "cluster_acc_greedy", "nmi", "ari", "active_components",
            "assignment_entropy", "mmd", "recon_mse", "augment_ari", "augment_mi", "silhouette"]
    print(f"{'metric':<22}{'val':>10}{'test':>10}")
    for k in keys:
        if f"val/{k}" not in metrics and f"test/{k}" not in metrics:
            continue  # a metric that reads labels, on images without them
        print(f"{k:<22}{metrics.get('val/' + k, float('nan')):>10.4f}"
              f"{metrics.get('test/' + k, float('nan')):>10.4f}")
    print(f"epochs {metrics['run/epochs']:.0f}, steps {metrics['run/steps']:.0f}, "
          f"training {metrics['run/train_seconds']:.0f} s")
    print(f"wrote {out / 'metrics.json'}, {out / 'figures'}/, {out / 'checkpoint'}/")


def _evaluate(args: argparse.Namespace) -> int:
    from gmwae_core import evaluate_checkpoint

    overrides = {}
    if args.dataset:
        overrides["dataset"] = args.dataset
    if args.data_dir:
        overrides["data_dir"] = args.data_dir
    if args.protocol:
        overrides["protocol"] = args.protocol
    if args.check and overrides:
        print("--check compares against the saved metrics; it cannot be combined with a "
              "different --dataset, --data-dir or --protocol. Drop --check to score the "
              "checkpoint on other data.", file=sys.stderr)
        return EXIT_USER_ERROR
    recomputed, saved = evaluate_checkpoint(args.checkpoint, overrides, args.assignments)
    print(f"{'metric':<26}{'recomputed':>12}{'saved':>12}")
    mismatched = []
    for key, value in recomputed.items():
        old = saved.get(key)
        print(f"{key:<26}{value:>12.6f}{'' if old is None else f'{old:12.6f}':>12}")
        if old is not None and old != value:
            mismatched.append(key)
    if args.json_out:
        Path(args.json_out).write_text(json.dumps(recomputed, indent=2, sort_keys=True))
    if args.check:
        if mismatched or not any(k in saved for k in recomputed):
            print(f"not reproduced: {mismatched or 'no saved test metrics'}", file=sys.stderr)
            return EXIT_TRAINING_FAILED
        print("all saved test metrics reproduced exactly")
    return 0


def describe_spec(spec) -> str:
    """What `study run SPEC` would do, read from the spec alone (no store is touched)."""
    objective, space = spec.objective, spec.search_space
    lines = [f"study {spec.name}: {', '.join(spec.families)} on {spec.dataset}, preset "
             f"{spec.preset}, {spec.trials} trials per family, {spec.max_iterations} iterations "
             f"per trial, scheduler {spec.scheduler.type}",
             f"objective: {objective.mode} {objective.metric} ("
             + ("reads the validation split's labels" if objective.reads_labels
                else "label-free: reads the validation images only") + ")"]
    lines += [f"  {w}" for w in objective.warnings(spec.searched_keys())]
    space_name = spec.space if isinstance(spec.space, str) else "inline"
    for family in spec.families:
        params = space.of(family)
        lines.append(f"{family} searches ({space_name}):" + ("" if params else " nothing"))
        lines += [f"  {p.describe()}" for p in params]
        lines.append(f"  {space.paper_point_note(family)}")
        others = ("other keys as at the paper point" if space.paper_point(family)
                  else "other keys sampled")
        enqueued = spec.start_origins(family)
        for i, point in enumerate(spec.points.get(family, ())):
            text = ", ".join(f"{k}={v}" for k, v in point.items())
            lines.append(f"  then (enqueued): {text}; {others}" + (
                "" if f"points[{i}]" in enqueued else f" (not enqueued: trials is {spec.trials})"))
    fixed = ", ".join(f"{k}={v}" for k, v in spec.fixed.items()) or "none"
    lines.append(f"fixed (every trial): {fixed}")
    lines.append("stores: " + ", ".join(
        f"{which} {getattr(spec.storage, which).replace('{name}', spec.name)}"
        for which in ("optuna", "mlflow", "ray")))
    return "\n".join(lines)


def _study(args: argparse.Namespace) -> int:
    if args.study_command == "validate":
        from study.spec import load_spec

        print(describe_spec(load_spec(args.spec, sets=args.sets)))
        return 0
    if args.study_command == "status":
        from study.status import find_spec, format_status, study_status

        spec = find_spec(args.study)
        print(format_status(spec, study_status(spec)))
        print(compare_hint(spec))
        return 0
    if args.study_command == "confirm":
        from study.confirm import confirm_study
        from study.resume import load_recorded_spec, spec_for_resume
        from study.status import find_spec

        spec = find_spec(args.study)
        spec = spec_for_resume(spec, load_recorded_spec(spec), compare=False)
        table = confirm_study(spec, args.seeds, args.out, args.address,
                              verbose=0 if args.quiet else 1)
        print("\n" + table["markdown"])
        print(f"wrote {table['out']}/confirm.md and confirm.json (also on the study's MLflow "
              f"parent run, under confirm/)")
        return 0
    if args.study_command == "export":
        from study.export import export_study
        from study.objective import Objective
        from study.status import find_spec

        nan = float("nan")
        rows = export_study(find_spec(args.study), args.out, args.top, args.family,
                            args.registry_uri)
        ran = rows[0]["objective"]  # the trials were chosen by it: its column comes first
        label = Objective(ran["metric"], ran["mode"]).label
        width = max(len(label), 9) + 1
        print(f"\n{'family':<8}{'trial':>6}{label:>{width}}{'val acc':>9}{'test acc':>9}"
              f"{'active':>7}  registered as / folder")
        for r in rows:
            m, value = r["metrics"], r["objective"]["value"]
            print(f"{r['family']:<8}{r['optuna_trial']:>6}"
                  f"{float('nan') if value is None else value:>{width}.4g}"
                  f"{m.get('val/cluster_acc', nan):>9.3f}"  # absent for images without labels
                  f"{m.get('test/cluster_acc', nan):>9.3f}{m['test/active_components']:>7.0f}  "
                  f"{r['registered_model']} v{r['version']}  {r['folder']}")
        print(f"wrote {Path(args.out) / 'export.json'}; check one with "
              f"`gmwae evaluate {rows[0]['folder']} --check`")
        return 0
    from study.resume import load_recorded_spec, spec_for_resume
    from study.runner import run_study
    from study.stores import mask_url
    from study.spec import apply_sets, load_spec, spec_from_dict
    from study.status import find_spec

    overrides: dict = {}
    if args.trials is not None:
        overrides["trials"] = args.trials
    resume = args.study_command == "resume" or args.resume
    if args.study_command == "resume":
        spec = find_spec(args.study)
        if args.sets:
            spec = spec_from_dict(apply_sets(spec.to_dict(), args.sets), f"{args.study} with --set")
        is_file = (Path(args.study).suffix in (".yaml", ".yml") or Path(args.study).is_file()
                   or bool(args.sets))
        recorded = load_recorded_spec(spec)
        spec = spec_for_resume(spec, recorded, overrides, compare=is_file)
    else:
        if args.smoke:
            overrides.update({"dataset": "synthetic", "trials": 2, "max_iterations": 1,
                              "steps_per_iteration": 20, "space": "smoke"})
            if args.trials is not None:
                overrides["trials"] = args.trials
        if args.name:
            overrides["name"] = args.name
        spec = load_spec(args.spec, overrides, args.sets)
        if resume:
            recorded = load_recorded_spec(spec)
            if recorded is not None:
                spec = spec_for_resume(spec, recorded,
                                       {"trials": args.trials} if args.trials else None)
    summary = run_study(spec, address=args.address, verbose=0 if args.quiet else 1, resume=resume)
    objective = spec.objective
    print(f"\nstudy {spec.name}: best {objective.metric} ({objective.mode}) per family")
    print(f"{'family':<8}{'trials':>7}{'failed':>7}{'best':>6}  {'origin':<12}"
          f"{objective.metric:>18}{'active':>7}  params")
    for fam, row in summary.items():
        if "value" not in row:
            print(f"{fam:<8}{row['trials']:>7}{row['failed']:>7}  no trial finished")
            continue
        params = ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}"
                           for k, v in sorted(row["params"].items()))
        print(f"{fam:<8}{row['trials']:>7}{row['failed']:>7}{row['number']:>6}  {row['origin']:<12}"
              f"{row['value']:>18.4g}{row.get('val/active_components') or float('nan'):>7.0f}"
              f"  {params}")
    mlflow_store = spec.store("mlflow")
    print(f"stores: optuna {mask_url(spec.store('optuna'))}, mlflow {mask_url(mlflow_store)}")
    print(compare_hint(spec))
    return 0


def compare_hint(spec) -> str:
    """How to open the study in MLflow's UI and optuna-dashboard, with the saved views."""
    from mlflow.tracking import MlflowClient

    from study.stores import mask_url
    from study.tracking import runs_view_url

    mlflow_store = spec.store("mlflow")
    served = mlflow_store.startswith(("http://", "https://"))
    experiment = MlflowClient(mlflow_store).get_experiment_by_name(spec.name)
    lines = [] if served else [f"  mlflow ui --backend-store-uri {mlflow_store}"]
    if experiment is not None:
        ui = mlflow_store if served else "http://127.0.0.1:5000"
        lines.append(f"  then open {mask_url(runs_view_url(ui, experiment.experiment_id))}")
    lines.append(f"  optuna-dashboard {mask_url(spec.store('optuna'))}")
    return "compare the trials:\n" + "\n".join(lines)


def _dashboard(args: argparse.Namespace) -> int:
    import time

    from dashboards.report import write_report

    from study.status import find_spec

    start = time.monotonic()
    out = write_report(find_spec(args.study), args.out, args.mlflow_url, not args.no_log)
    print(f"wrote {out} ({out.stat().st_size / 1e6:.1f} MB, {time.monotonic() - start:.1f} s); "
          f"open it in a browser (no network needed)")
    return 0


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    from gmwae_core import CheckpointError, ConfigError, DataError, NonFiniteLossError

    try:
        return {"train": _train, "evaluate": _evaluate, "study": _study,
                "dashboard": _dashboard}[args.command](args)
    except (ConfigError, DataError, CheckpointError) as e:
        print(f"gmwae {args.command}: error: {e}", file=sys.stderr)
        return EXIT_USER_ERROR
    except NonFiniteLossError as e:
        print(f"gmwae {args.command}: training failed: {e}", file=sys.stderr)
        return EXIT_TRAINING_FAILED


if __name__ == "__main__":
    sys.exit(main())
