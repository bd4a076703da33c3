"""The MLflow Model of an exported checkpoint (saved with it as MLflow "model from code").

    model = mlflow.pyfunc.load_model("models:/quickstart-gmwae@champion")
    model.predict(images)    # float32 (N, 784) in [0, 1], or a DataFrame of 784 such columns

returns one row per image: `cluster` (k = argmax q(k|x)), `q_k_0` ... `q_k_{K-1}` (q(k|x))
and `z_0` ... `z_{d-1}` (the mean of q(z|k,x) at that k). The checkpoint is the model's
artifact `checkpoint`; gmwae_core travels with it (code_paths), so loading needs only the
pip requirements the model lists, not this repository. Images go through the network in
batches of the evaluation's size, as `gmwae evaluate` does, so the clusters are the same.
"""
import mlflow
import numpy as np
import pandas as pd

PIXELS = 28 * 28


def images_from(model_input) -> np.ndarray:
    """(N, 784) float32 in [0, 1] from what `predict` was given; ValueError naming the
    problem and the fix otherwise."""
    x = model_input.to_numpy() if isinstance(model_input, pd.DataFrame) else np.asarray(model_input)
    if x.ndim != 2 or x.shape[1] != PIXELS:
        raise ValueError(f"predict takes images as rows of {PIXELS} pixels, shape (N, {PIXELS}), "
                         f"but got shape {x.shape}. Flatten 28x28 images with "
                         f"x.reshape(len(x), {PIXELS}).")
    if not np.issubdtype(x.dtype, np.number):
        raise ValueError(f"predict takes numeric pixels, but got dtype {x.dtype}.")
    x = x.astype(np.float32, copy=False)
    if len(x) and (not np.isfinite(x).all() or x.min() < 0.0 or x.max() > 1.0):
        raise ValueError(f"predict takes pixel values in [0, 1], but got values from "
                         f"{np.nanmin(x):g} to {np.nanmax(x):g}. Divide 8-bit images by 255.")
    return x


class GMLVMClusters(mlflow.pyfunc.PythonModel):
    """Cluster assignment q(k|x) and latent means of a GM-WAE or GM-VAE checkpoint."""

    def load_context(self, context):
        from gmwae_core.checkpoint import load_model

        self.cfg, self.model = load_model(context.artifacts["checkpoint"])

    def predict(self, context, model_input, params=None):
        import torch

        from gmwae_core.training import EVAL_BATCH

        x = torch.from_numpy(images_from(model_input)).view(-1, 1, 28, 28)
        q_ks, means = [], []
        with torch.no_grad():
            for i in range(0, len(x), EVAL_BATCH):
                logits, q_z_mean, _ = self.model.encode(x[i: i + EVAL_BATCH])
                q_ks.append(torch.softmax(logits, -1))
                means.append(q_z_mean)
        K, d = self.cfg.model.K, self.cfg.model.latent_dim
        q_k = torch.cat(q_ks) if q_ks else torch.zeros(0, K)
        mean = torch.cat(means) if means else torch.zeros(0, K, d)
        k = q_k.argmax(1)
        z = mean[torch.arange(len(k)), k]
        out = {"cluster": k.numpy().astype(np.int64)}
        out.update({f"q_k_{j}": q_k[:, j].numpy().astype(np.float64) for j in range(K)})
        out.update({f"z_{j}": z[:, j].numpy().astype(np.float64) for j in range(d)})
        return pd.DataFrame(out)


mlflow.models.set_model(GMLVMClusters())
