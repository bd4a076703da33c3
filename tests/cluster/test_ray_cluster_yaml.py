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
    head_commands = " ".join(config["head_setup_commands"] + config["head_start_ray_commands"])
    assert "--host 127.0.0.1" in head_commands and "--dashboard-host=127.0.0.1" in head_commands


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
def test_the_heads_pkill_stops_an_mlflow_server_but_never_its_own_shell(name, tmp_path):
    """Ray runs each setup command as `bash --login -c -i '<command>'`, whose command line
    holds the whole text, the `nohup ... mlflow server` part too. The shipped pattern must
    match a running server (python running .../mlflow server) and not that shell. Checked
    with pgrep and the same pattern on real processes (pkill here could stop another
    test's MLflow server)."""
    import re
    import shlex
    import subprocess
    import sys

    config = yaml.safe_load((PATH.parent / name).read_text())
    commands = [c for key in ("setup_commands", "head_setup_commands", "worker_setup_commands",
                              "head_start_ray_commands", "worker_start_ray_commands")
                for c in config.get(key) or [] if "pkill" in c]
    assert commands, "the head stops an earlier MLflow server before starting one"
    server = tmp_path / "venv" / "bin" / "mlflow"
    server.parent.mkdir(parents=True)
    server.write_text(f"#!{sys.executable}\nimport time\ntime.sleep(60)\n")
    server.chmod(0o755)
    for command in commands:
        pattern = re.search(r"pkill -f ('[^']*'|\"[^\"]*\")", command)
        assert pattern, f"a pkill without -f PATTERN: {command}"
        pgrep = f"pgrep -f {pattern.group(1)}"
        running = subprocess.Popen([str(server), "server", "--host", "127.0.0.1"])
        # a shell whose command line holds the text (`; true`: bash would exec a lone sleep)
        shell = subprocess.Popen(["bash", "-c", f"sleep 60; true # {command}"])
        try:
            found = {int(p) for p in subprocess.run(["bash", "-c", pgrep], capture_output=True,
                                                    text=True).stdout.split()}
            assert running.pid in found, (pgrep, shlex.quote(command))
            assert shell.pid not in found, f"{name}: the pattern matches its own shell: {pgrep}"
        finally:
            running.kill()
            shell.kill()
