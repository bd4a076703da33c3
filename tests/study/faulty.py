"""A trainable whose paper-point trial diverges for real (lr 1e30 -> NaN loss in the core)."""
from study.trainable import train_trial


def diverge_on_paper_point(config, setup):
    if config.get("K") == 10 and config.get("latent_dim") == 10 and setup.family == "gmwae":
        config = {**config, "lr": 1e30}
    return train_trial(config, setup)
