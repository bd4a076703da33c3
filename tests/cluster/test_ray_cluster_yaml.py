"""ray_cluster.yaml passes Ray's own config checks (as `ray up` runs them)."""
import re
from pathlib import Path

import pytest
import yaml
from ray.autoscaler._private.util import prepare_config, validate_config

PATH = Path(__file__).parents[2] / "ray_cluster.yaml"
GPU_INSTANCE = re.compile(r"^(g4dn|g5|g6|g6e|p3|p4d|p5)\.")


def test_it_validates_and_names_gpu_workers_and_a_head_without_trials():
    config = prepare_config(yaml.safe_load(PATH.read_text()))
    validate_config(config)
    types = config["available_node_types"]
    head = types[config["head_node_type"]]
    assert head["resources"] == {"CPU": 0, "GPU": 0}
    workers = [t for name, t in types.items() if name != config["head_node_type"]]
    assert workers and all(GPU_INSTANCE.match(t["node_config"]["InstanceType"]) for t in workers)
    assert all(t["node_config"]["InstanceMarketOptions"]["MarketType"] == "spot" for t in workers)
    assert all(t["max_workers"] >= t["min_workers"] for t in workers)
    assert config["idle_timeout_minutes"] > 0
    scripts = PATH.parent / "cluster"
    assert "--host 127.0.0.1" in (scripts / "head_setup.sh").read_text()
    assert "--dashboard-host=127.0.0.1" in (scripts / "start_head.sh").read_text()


def test_a_broken_config_is_rejected_by_the_same_check():
    config = yaml.safe_load(PATH.read_text())
    config["available_node_types"]["gpu_worker"]["max_workers"] = "eight"
    with pytest.raises(Exception):
        validate_config(prepare_config(config))


def test_no_secret_in_the_file_and_a_comment_above_every_key():
    text = PATH.read_text()
    assert not re.search(r"PASSWORD '[^$]", text) and "password:" not in text.lower()
    lines = text.splitlines()
    key = re.compile(r"^\s*-?\s*[A-Za-z_/~][\w./~-]*:(\s|$)")
    folded = None  # indent of a `>-` line whose continuation lines are text, not keys
    for i, line in enumerate(lines):
        indent = len(line) - len(line.lstrip())
        if folded is not None:
            if not line.strip() or indent > folded:
                continue
            folded = None
        if key.match(line):
            above = next(l for l in reversed(lines[:i]) if l.strip())
            assert above.strip().startswith("#"), f"line {i + 1} has no comment above: {line!r}"
        if line.rstrip().endswith(">-"):
            folded = indent


@pytest.mark.parametrize("name", ["ray_cluster.yaml", "ray_cluster_onprem.yaml"])
def test_every_node_command_is_a_shipped_script_and_none_uses_pkill(name):
    """The node commands live once, in cluster/, for both files. Ray runs each command as
    `bash --login -c -i '<command>'`, whose command line holds the whole text: a `pkill -f`
    of any text in it can kill that shell, so the head stops its earlier MLflow server by
    the pid file its setup wrote, and nothing uses pkill."""
    config = yaml.safe_load((PATH.parent / name).read_text())
    commands = [c for key in ("setup_commands", "head_setup_commands", "worker_setup_commands",
                              "head_start_ray_commands", "worker_start_ray_commands")
                for c in config.get(key) or []]
    assert len(commands) == 4
    for command in commands:
        script = re.search(r"bash ~/gmwae-studies/(cluster/\w+\.sh)$", command)
        assert script and (PATH.parent / script.group(1)).is_file(), command
    texts = [PATH.parent.joinpath(name).read_text(),
             *(p.read_text() for p in (PATH.parent / "cluster").glob("*.sh"))]
    assert not any(re.search(r"\bpkill\b", t) for t in texts)


def test_head_and_workers_have_roles_of_their_own_and_workers_reach_only_the_bucket():
    """The AWS part no test here can run (IAM, EC2) is checked as data: the node types name
    the two instance profiles cluster/aws/create_roles.sh makes, the workers' policy
    reaches the study's bucket under ray/ and nothing else, and the head may pass the
    worker role only and terminate only its own cluster's nodes."""
    import json
    import subprocess

    config = yaml.safe_load(PATH.read_text())
    types = config["available_node_types"]
    profiles = {name: t["node_config"]["IamInstanceProfile"]["Name"] for name, t in types.items()}
    assert profiles == {"head": "gmwae-head", "gpu_worker": "gmwae-worker"}
    aws = PATH.parent / "cluster" / "aws"
    worker = json.loads((aws / "worker-policy.json").read_text())["Statement"]
    actions = {a for s in worker for a in s["Action"]}
    assert actions == {"s3:ListBucket", "s3:GetObject", "s3:PutObject", "s3:DeleteObject"}
    resources = {s["Resource"] for s in worker}
    assert resources == {"arn:aws:s3:::BUCKET", "arn:aws:s3:::BUCKET/ray/*"}
    head = {s["Sid"]: s for s in json.loads((aws / "head-policy.json").read_text())["Statement"]}
    passing = [s for s in head.values() if "iam:PassRole" in s["Action"]]
    assert len(passing) == 1 and all(r.endswith("/gmwae-worker") for r in passing[0]["Resource"])
    assert not any(a.startswith("iam:") for s in head.values() if s not in passing
                   for a in s["Action"])
    terminate = [s for s in head.values() if "ec2:TerminateInstances" in s["Action"]]
    assert terminate[0]["Condition"] == {
        "StringEquals": {"ec2:ResourceTag/ray-cluster-name": "CLUSTER_NAME"}}
    assert not any("*" == a or a.endswith(":*") for s in head.values() for a in s["Action"])
    assert subprocess.run(["bash", "-n", str(aws / "create_roles.sh")]).returncode == 0
    usage = subprocess.run(["bash", str(aws / "create_roles.sh")], capture_output=True, text=True)
    assert usage.returncode != 0 and "usage: bash cluster/aws/create_roles.sh BUCKET" in usage.stderr


def test_every_shipped_gpu_spec_fits_one_gpu_of_the_clusters_worker_type():
    """The study sizes each trial's GPU share from the node types' GPU memory (the
    instance type names the GPU); every shipped spec that asks for a GPU must fit the
    shipped worker type by that estimate, or its study would refuse to start there."""
    from study.cluster import instance_gpu_memory, size_gpu_share
    from study.spec import apply_sets, load_spec, spec_from_dict

    worker = yaml.safe_load(PATH.read_text())["available_node_types"]["gpu_worker"]
    memory = instance_gpu_memory(worker["node_config"])
    assert memory == 24  # g5: one A10G
    specs = [load_spec(p) for p in sorted((PATH.parent / "studies").glob("*.yaml"))]
    gpu_specs = [s for s in specs if s.resources.gpu > 0]
    assert {s.name for s in gpu_specs} >= {"paper", "paper-cluster", "wide"}
    for spec in gpu_specs:
        sized, lines = size_gpu_share(spec_from_dict(apply_sets(
            spec.to_dict(), [f"resources.gpu_memory_gb={memory:g}"])))
        assert 0 < sized.resources.gpu <= 1.0, (spec.name, lines)
