import pytest

from gmwae_core import ConfigError, RunConfig, TrainConfig, from_preset, parse_overrides


def test_presets_build_and_round_trip_through_a_dict():
    for preset in ("paper", "cpu"):
        cfg = from_preset(preset)
        assert RunConfig.from_dict(cfg.to_dict()) == cfg
    paper = from_preset("paper")
    assert (paper.model.K, paper.model.latent_dim, paper.model.decoder_width) == (10, 10, 128)
    assert (paper.train.batch_size, paper.train.lr, paper.train.beta1) == (128, 8e-4, 0.5)
    assert paper.model.num_samples == 5 and paper.model.lambda_mmd == 10.0


def test_overrides_take_dotted_and_bare_keys_and_parse_strings():
    cfg = from_preset("cpu", parse_overrides(["model.K=12", "lr=0.002", "minutes=none"]),
                      family="gmvae")
    assert cfg.model.K == 12 and cfg.train.lr == 0.002 and cfg.train.minutes is None
    assert cfg.family == "gmvae"
    assert from_preset("cpu", {"compile": "true"}).train.compile is True


@pytest.mark.parametrize("overrides,pattern", [
    ({"model.KK": 3}, r"Unknown config key `model.KK`.*Did you mean `model.K`"),
    ({"latnt_dim": 3}, r"Unknown config key `latnt_dim`.*latent_dim"),
    ({"model.K": "ten"}, r"`model.K` must be a int, but got 'ten'"),
    ({"model.K": 2.5}, r"`model.K` must be a int, but got 2.5"),
    ({"batch_size": 0}, r"`train.batch_size` must be at least 2.*0"),
    ({"family": "vae"}, r"`family` must be one of"),
    ({"dataset": "cifar"}, r"`data.dataset` must be one of"),
    ({"compile": "maybe"}, r"`train.compile` must be true or false, but got 'maybe'"),
])
def test_bad_values_are_rejected_by_name(overrides, pattern):
    with pytest.raises(ConfigError, match=pattern):
        from_preset("cpu", overrides)


def test_from_dict_rejects_unknown_sections_and_keys():
    with pytest.raises(ConfigError, match="Unknown config key `optim`"):
        RunConfig.from_dict({"optim": {}})
    with pytest.raises(ConfigError, match="Unknown config key `train.learning_rate`"):
        RunConfig.from_dict({"train": {"learning_rate": 1e-3}})


def test_configs_are_frozen_and_checked_where_made():
    cfg = TrainConfig()
    with pytest.raises(Exception):
        cfg.lr = 1.0  # type: ignore[misc]
    with pytest.raises(ConfigError, match=r"`train.lr`.*-1"):
        TrainConfig(lr=-1.0)
    with pytest.raises(ConfigError, match="key=value"):
        parse_overrides(["K12"])
