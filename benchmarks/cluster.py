"""The smoke study's wall time on the local 3-node cluster vs on plain local Ray.

    python benchmarks/cluster.py --out benchmarks/results/cluster.json

1. Plain local Ray: `gmwae study run SPEC` (ray.init on this machine, sqlite stores).
2. The local cluster (study.local_cluster: PostgreSQL, an MLflow server, a Ray head with 0
   CPUs and two 1-CPU workers, all `ray start`): `ray job submit --working-dir . -- gmwae
   study run SPEC` with the PostgreSQL/MLflow-server stores, timed from submission to the
   job's end. The cluster's start-up is timed apart (paid once, not per study).

Both run studies/smoke.yaml (3 trials per family, 2 at a time, 1 CPU each).
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).parents[1]
sys.path.insert(0, str(ROOT))
BIN = Path(sys.executable).parent


def spec_file(folder: Path, storage: dict[str, str], name: str) -> Path:
    text = (ROOT / "studies/smoke.yaml").read_text().replace("name: smoke", f"name: {name}")
    text = text.replace("optuna: sqlite:///runs/{name}/optuna.db", f"optuna: '{storage['optuna']}'")
    text = text.replace("mlflow: sqlite:///runs/{name}/mlflow.db", f"mlflow: {storage['mlflow']}")
    text = text.replace("ray: runs/{name}/ray", f"ray: {storage['ray']}")
    path = folder / f"{name}.yaml"
    path.write_text(text)
    return path


def run(cmd: list[str], **kw) -> float:
    start = time.monotonic()
    done = subprocess.run(cmd, capture_output=True, text=True, **kw)
    if done.returncode:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{done.stderr[-3000:]}{done.stdout[-3000:]}")
    return time.monotonic() - start


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", default="benchmarks/results/cluster.json")
    args = p.parse_args(argv)
    out = Path(args.out).resolve()
    from study.local_cluster import LocalCluster

    env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0"}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        local = spec_file(tmp, {"optuna": f"sqlite:///{tmp}/optuna.db",
                                "mlflow": f"sqlite:///{tmp}/mlflow.db", "ray": str(tmp / "ray")},
                          "bench-local")
        local_s = run([str(BIN / "gmwae"), "study", "run", str(local), "--quiet"], cwd=tmp, env=env)

        start = time.monotonic()
        cluster = LocalCluster(tmp / "cluster", workers=2, cpus_per_worker=1).start()
        startup_s = time.monotonic() - start
        try:
            spec = spec_file(tmp, {"optuna": cluster.optuna_url(), "mlflow": cluster.mlflow_url,
                                   "ray": str(cluster.storage_path)}, "bench-cluster")
            cluster_s = run([str(BIN / "ray"), "job", "submit", "--address", cluster.dashboard_url,
                             "--working-dir", ".", "--", "gmwae", "study", "run", str(spec),
                             "--quiet"], cwd=ROOT, env=cluster.env())
        finally:
            cluster.stop()
    result = {"study": "studies/smoke.yaml", "local_ray_seconds": local_s,
              "cluster_seconds": cluster_s, "cluster_startup_seconds": startup_s,
              "ratio": cluster_s / local_s}
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2))
    print(f"{'where':<44}{'wall s':>8}")
    print(f"{'plain local Ray (ray.init), sqlite stores':<44}{local_s:>8.1f}")
    print(f"{'local 3-node cluster, ray job submit':<44}{cluster_s:>8.1f}   "
          f"({cluster_s / local_s:.2f}x)")
    print(f"{'  cluster start-up (once)':<44}{startup_s:>8.1f}")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
