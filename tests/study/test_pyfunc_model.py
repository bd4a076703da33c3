"""The exported MLflow Model, in-process: it predicts what the checkpoint's network gives,
and an export whose model cannot load or predict stops before anything is registered."""
import json

import mlflow
import numpy as np
import pytest
import torch

from gmwae_core import Trainer, from_preset, load_splits, save_checkpoint
from study.export import ExportError, _save_mlflow_model

SMALL = {"dataset": "synthetic", "decoder_width": 8, "batch_size": 32, "pretrain_steps": 0,
         "num_samples": 1, "K": 4, "latent_dim": 3}


def checkpoint(folder):
    cfg = from_preset("cpu", SMALL, family="gmwae")
    trainer = Trainer(cfg, load_splits(cfg.data))
    trainer.train_steps(2)
    save_checkpoint(trainer, folder, {})
    return trainer


def test_the_folder_becomes_an_mlflow_model_that_gives_the_networks_clusters(tmp_path):
    trainer = checkpoint(tmp_path / "t")
    x = trainer.splits.test_x[:40]
    _save_mlflow_model(tmp_path / "t", x[:2].reshape(2, -1).numpy(), "a test trial")
    model = mlflow.pyfunc.load_model(str(tmp_path / "t"))
    out = model.predict(x.reshape(len(x), -1).numpy())
    trainer.model.eval()
    with torch.no_grad():
        logits, mean, _ = trainer.model.encode(x)
    k = logits.argmax(1)
    assert out["cluster"].tolist() == k.tolist()
    assert np.allclose(out[[f"q_k_{j}" for j in range(4)]].to_numpy(),
                       torch.softmax(logits, -1).numpy(), atol=1e-6)
    assert np.allclose(out[["z_0", "z_1", "z_2"]].to_numpy(),
                       mean[torch.arange(len(k)), k].numpy(), atol=1e-6)
    signature = model.metadata.signature
    assert signature.inputs.to_dict() == [{"type": "tensor", "tensor-spec":
                                          {"dtype": "float32", "shape": (-1, 784)}}]
    assert "cluster" in signature.outputs.input_names()
    assert (tmp_path / "t" / "weights.pt").is_file()  # the export's own files stay


def test_a_model_that_does_not_load_is_an_export_error_naming_it(tmp_path):
    trainer = checkpoint(tmp_path / "t")
    config = json.loads((tmp_path / "t" / "config.json").read_text())
    config["model"]["K"] = 7  # the weights no longer fit (and the manifest no longer matches)
    (tmp_path / "t" / "config.json").write_text(json.dumps(config))
    with pytest.raises(ExportError, match=r"The MLflow Model of a broken trial does not load or "
                                          r"predict: .*Nothing was registered\."):
        _save_mlflow_model(tmp_path / "t", trainer.splits.test_x[:2].reshape(2, -1).numpy(),
                           "a broken trial")
    assert not (tmp_path / "t" / "MLmodel").exists()
