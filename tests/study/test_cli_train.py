"""`gmwae train` / `gmwae evaluate` end to end in subprocesses, as a user runs them."""
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

GMWAE = str(Path(sys.executable).parent / "gmwae")


def gmwae(*args, check=True):
    proc = subprocess.run([GMWAE, *map(str, args)], capture_output=True, text=True, timeout=600)
    if check and proc.returncode != 0:
        raise AssertionError(f"gmwae {args} failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    return proc


@pytest.fixture(scope="module")
def smoke_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("smoke")
    gmwae("train", "--smoke", "--out", out)
    return out


def test_smoke_train_writes_metrics_figures_and_checkpoint(smoke_run):
    metrics = json.loads((smoke_run / "metrics.json").read_text())
    for key in ("test/cluster_acc", "test/cluster_acc_greedy", "test/nmi", "test/ari",
                "test/active_components", "test/assignment_entropy", "test/mean_entropy",
                "test/mmd", "test/recon_mse", "test/kl_discrete", "test/kl_continuous",
                "val/cluster_acc", "train/loss", "prior/sigma0", "run/steps"):
        assert key in metrics, key
    assert 0.0 <= metrics["test/cluster_acc"] <= 1.0
    figures = sorted(p.stem for p in (smoke_run / "figures").glob("*.png"))
    assert figures == sorted(["reconstructions", "samples_per_k", "near_mode_samples",
                              "interpolations", "mode_interpolations", "label_by_k",
                              "latent_embedding"])
    assert all(p.stat().st_size > 2000 for p in (smoke_run / "figures").glob("*.png"))
    history = json.loads((smoke_run / "history.json").read_text())
    assert len(history["epochs"]) == 1 and len(history["steps"]) >= 2
    weights = torch.load(smoke_run / "checkpoint" / "weights.pt", weights_only=True)
    assert "decoder.fc.0.weight" in weights


def test_evaluate_reproduces_the_saved_test_metrics_exactly(smoke_run, tmp_path):
    proc = gmwae("evaluate", smoke_run / "checkpoint", "--check", "--json", tmp_path / "m.json")
    assert "reproduced exactly" in proc.stdout
    saved = json.loads((smoke_run / "metrics.json").read_text())
    again = json.loads((tmp_path / "m.json").read_text())
    assert again == {k: v for k, v in saved.items() if k.startswith("test/")}


def test_evaluate_scores_a_checkpoint_with_the_papers_protocol(smoke_run, tmp_path):
    proc = gmwae("evaluate", smoke_run / "checkpoint", "--protocol", "paper", "--json",
                 tmp_path / "p.json")
    paper = json.loads((tmp_path / "p.json").read_text())
    assert paper["paper/n_held"] == 300 and paper["paper/n_fit"] > 2000  # synthetic: 3,000 pooled
    assert 0.0 <= paper["paper/cluster_acc_greedy"] <= paper["paper/cluster_acc"] + 1e-9
    assert "paper/cluster_acc_greedy" in proc.stdout
    refused = gmwae("evaluate", smoke_run / "checkpoint", "--protocol", "paper", "--check",
                    check=False)
    assert refused.returncode == 2 and "--check" in refused.stderr and "--protocol" in refused.stderr


def test_gmvae_starts_from_a_gmwae_checkpoint(smoke_run, tmp_path):
    gmwae("train", "--smoke", "--family", "gmvae", "--init-from", smoke_run / "checkpoint",
          "--out", tmp_path / "vae", "--quiet")
    cfg = json.loads((tmp_path / "vae" / "checkpoint" / "config.json").read_text())
    assert cfg["family"] == "gmvae"


@pytest.mark.parametrize("args,message", [
    (["--set", "model.KK=3"], "Unknown config key `model.KK`"),
    (["--set", "K=1"], "`model.K` must be at least 2"),
    (["--set", "latent_dim=0"], "`model.latent_dim` must be at least 1"),
    (["--set", "prior_overlap=1.5"], "`model.prior_overlap` must lie strictly between 0 and 1"),
    (["--set", "decoder_width=0"], "`model.decoder_width` must be a positive multiple of 4"),
    (["--set", "batch_size=-4"], "`train.batch_size` must be at least 2"),
    (["--set", "lr"], "`--set` takes key=value"),
])
def test_bad_config_exits_2_with_one_clear_line(args, message, tmp_path):
    proc = gmwae("train", "--smoke", "--out", tmp_path / "x", *args, check=False)
    assert proc.returncode == 2
    assert message in proc.stderr
    assert "Traceback" not in proc.stderr
    assert not (tmp_path / "x" / "metrics.json").exists()


def test_data_folder_without_idx_files_is_a_clear_error(tmp_path):
    (tmp_path / "empty").mkdir()
    proc = gmwae("train", "--smoke", "--dataset", "mnist", "--data-dir", tmp_path / "empty",
                 "--out", tmp_path / "x", check=False)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert "lacks train-images-idx3-ubyte" in proc.stderr


def test_bad_checkpoints_are_clear_errors(smoke_run, tmp_path):
    import shutil

    broken = tmp_path / "broken"
    shutil.copytree(smoke_run / "checkpoint", broken)
    (broken / "weights.pt").write_bytes(b"garbage")
    proc = gmwae("evaluate", broken, check=False)
    assert proc.returncode == 2 and "altered or is corrupt" in proc.stderr
    assert "Traceback" not in proc.stderr
    proc = gmwae("train", "--smoke", "--set", "K=4", "--init-from", smoke_run / "checkpoint",
                 "--out", tmp_path / "y", check=False)
    assert proc.returncode == 2 and "does not fit a model with K=4" in proc.stderr
    proc = gmwae("evaluate", tmp_path / "nope", check=False)
    assert proc.returncode == 2 and "does not exist" in proc.stderr
