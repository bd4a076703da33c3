"""Search spaces written in YAML (search_spaces/*.yaml, a file, or inline in the spec)."""
import optuna
import pytest

from gmwae_core import Trainer, load_splits
from gmwae_core import PAPER_PRIOR_OVERLAP
from gmwae_core.config import FAMILIES
from search_spaces import SpaceError, load_space, space_names
from study.spec import SpecError, spec_from_dict

@pytest.mark.parametrize("name", space_names())
@pytest.mark.parametrize("family", FAMILIES)
def test_every_shipped_space_samples_configs_the_core_accepts(name, family):
    """Sampled with Optuna (TPE after random start-up), not only the paper point: each
    sampled configuration validates, and its model is built and takes a step."""
    spec = spec_from_dict({"name": "s", "space": name, "dataset": "synthetic",
                           "fixed": {"eval_size": 100}})
    space = spec.search_space
    study = optuna.create_study(sampler=optuna.samplers.TPESampler(seed=0, n_startup_trials=3))
    seen = []
    for _ in range(6):
        trial = study.ask()
        params = space(trial, family)
        cfg = spec.run_config(family, params)
        assert cfg.family == family
        seen.append(params)
        study.tell(trial, float(len(seen)))
    assert all(set(p) == {q.name for q in space.of(family)} for p in seen)
    if name == "smoke":  # the smallest shapes: build one and step it
        cfg = spec.run_config(family, {**seen[-1], "decoder_width": 8, "batch_size": 16,
                                       "num_samples": 1, "pretrain_steps": 0, "device": "cpu"})
        Trainer(cfg, load_splits(cfg.data)).train_steps(1)


def old_smoke(trial, family):
    """The smoke space written as a define-by-run function: the YAML space must draw the same."""
    out = {}
    if family == "gmwae":
        out["lambda_mmd"] = trial.suggest_float("lambda_mmd", 1.0, 100.0, log=True)
    out["prior_overlap"] = trial.suggest_float("prior_overlap", 0.01, 0.2, log=True)
    out["latent_dim"] = trial.suggest_int("latent_dim", 4, 10)
    out["K"] = trial.suggest_int("K", 8, 12)
    return out


def old_default(trial, family):
    """The default space written as a define-by-run function: the YAML space must draw the same."""
    out = {}
    if family == "gmwae":
        out["lambda_mmd"] = trial.suggest_float("lambda_mmd", 1.0, 100.0, log=True)
    out["prior_overlap"] = trial.suggest_float("prior_overlap", 0.005, 0.2, log=True)
    out["latent_dim"] = trial.suggest_int("latent_dim", 4, 16)
    out["K"] = trial.suggest_int("K", 8, 16)
    out["lr"] = trial.suggest_float("lr", 2e-4, 3e-3, log=True)
    out["batch_size"] = trial.suggest_categorical("batch_size", [32, 64, 128])
    out["decoder_width"] = trial.suggest_categorical("decoder_width", [16, 32, 64])
    return out


@pytest.mark.parametrize("name, old", [("smoke", old_smoke), ("default", old_default)])
@pytest.mark.parametrize("family", FAMILIES)
def test_the_yaml_spaces_draw_what_the_old_named_spaces_drew(name, old, family):
    """Same parameters, ranges and scales: the same seeded draws, trial for trial."""
    space = load_space(name)
    new_study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=3))
    old_study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=3))
    for _ in range(5):
        assert space(new_study.ask(), family) == old(old_study.ask(), family)
    # and the same paper point as the old _PAPER (+ _PAPER_EXTRA for default)
    expected = {"lambda_mmd": 10.0, "prior_overlap": PAPER_PRIOR_OVERLAP, "latent_dim": 10, "K": 10}
    if name == "default":
        expected.update({"lr": 1e-3, "batch_size": 64, "decoder_width": 32})
    if family != "gmwae":
        expected.pop("lambda_mmd")
    assert space.paper_point(family) == expected


def test_an_inline_space_in_the_spec_and_its_paper_point():
    spec = spec_from_dict({"name": "s", "space": {
        "K": {"type": "int", "low": 8, "high": 20},
        "lr": {"type": "float", "low": 1e-4, "high": 1e-2, "log": True},
        "batch_size": {"type": "categorical", "choices": [32, 64]}}})
    space = spec.search_space
    assert space.paper_point("gmwae") == {"K": 10}  # lr and batch size have no paper value
    assert "sampled: lr, batch_size" in space.paper_point_note("gmwae")
    assert spec.objective.metric == "val/ami"  # K is searched
    narrow = spec_from_dict({"name": "s", "space": {"K": {"type": "int", "low": 12, "high": 20}}})
    assert narrow.search_space.paper_point("gmvae") is None
    assert "K=10 outside the space" in narrow.search_space.paper_point_note("gmvae")


def test_a_family_draws_its_own_range_where_by_family_gives_one():
    """The options' weights mean something else on GM-VAE's loss (nats): the quickstart's
    GM-VAE draws them in [0, 100], its GM-WAE in [0, 8] and [0, 2]."""
    space = load_space("quickstart")
    ranges = {family: {p.name: (p.low, p.high) for p in space.of(family)} for family in FAMILIES}
    assert ranges["gmwae"]["consistency_weight"] == (0.0, 8.0)
    assert ranges["gmwae"]["balance_weight"] == (0.0, 2.0)
    assert ranges["gmvae"]["consistency_weight"] == ranges["gmvae"]["balance_weight"] == (0.0, 100.0)
    assert ranges["gmwae"]["lr"] == ranges["gmvae"]["lr"]  # the others are shared
    drawn = {}
    for family in FAMILIES:
        study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0))
        drawn[family] = [space(study.ask(), family)["consistency_weight"] for _ in range(20)]
    assert max(drawn["gmwae"]) <= 8.0 < max(drawn["gmvae"]) <= 100.0
    assert space.paper_point("gmvae")["consistency_weight"] == 0.0  # the paper point stands
    inline = load_space({"lr": {"type": "float", "low": 1e-4, "high": 1e-2, "log": True,
                                "by_family": {"gmvae": {"low": 1e-3, "paper": 2e-3}}}})
    gmvae_lr = inline.of("gmvae")[0]
    assert (gmvae_lr.low, gmvae_lr.high, gmvae_lr.log) == (1e-3, 1e-2, True)
    assert inline.paper_point("gmvae") == {"lr": 2e-3} and inline.paper_point("gmwae") == {}
    assert inline.of("gmvae")[0].describe() == "lr: float 0.001..0.01, log"


@pytest.mark.parametrize("space, pattern", [
    ({"Kk": {"type": "int", "low": 2, "high": 9}}, r"Unknown config key `Kk`\. Did you mean `K`\?"),
    ({"K": {"type": "int", "low": 9, "high": 9}}, r"`K.low` must be below high \(9\), but got 9"),
    ({"lr": {"type": "float", "low": 0.0, "high": 0.1, "log": True}},
     r"`lr.low` must be > 0 with log: true, but got 0\.0\. Raise low above 0"),
    ({"batch_size": {"type": "categorical", "choices": []}},
     r"`batch_size.choices` must be a non-empty list, but got \[\]"),
    ({"K": {"type": "int", "low": 2, "high": 9, "families": ["gmm"]}},
     r"`K.families` may only contain \['gmwae', 'gmvae'\], but got \['gmm'\]"),
    ({"lambda_mmd": {"type": "float", "low": 1, "high": 9, "families": ["gmvae"]}},
     r"`lambda_mmd.families` may only name families that have lambda_mmd \(\['gmwae'\]\)"),
    ({"K": {"type": "integer", "low": 2, "high": 9}}, r"`K.type` must be one of \['float', 'int', "
                                                      r"'categorical'\], but got 'integer'"),
    ({"K": {"type": "int", "low": 2.5, "high": 9}}, r"`K.low` must be a whole number for type int"),
    ({"K": {"type": "int", "lo": 2, "high": 9}}, r"`K.lo` is not a parameter field"),
    ({"K": 10}, r"`K` must be a mapping with a type"),
    ({"lambda_mmd": {"type": "float", "low": 1, "high": 9, "by_family": {"gmvae": {"high": 50}}}},
     r"`lambda_mmd.by_family` may only name the parameter's families \(\['gmwae'\]\), but "
     r"got 'gmvae'"),
    ({"K": {"type": "int", "low": 2, "high": 9, "by_family": [{"gmvae": {"high": 50}}]}},
     r"`K.by_family` must map a family to the fields it changes"),
    ({"K": {"type": "int", "low": 2, "high": 9, "by_family": {"gmvae": {"type": "float"}}}},
     r"`K.by_family.gmvae.type` cannot differ by family"),
    ({"K": {"type": "int", "low": 2, "high": 9, "by_family": {"gmvae": {"high": 1}}}},
     r"\(by_family.gmvae\): `K.low` must be below high \(1\), but got 2"),
    ({"K": {"type": "int", "low": 2, "high": 9}, "model.K": {"type": "int", "low": 2, "high": 5}},
     r"`model.K` names the same config key as `K`"),
])
def test_bad_spaces_exit_with_the_key_the_rule_the_value_and_the_fix(space, pattern):
    with pytest.raises(SpaceError, match=pattern):
        load_space(space)
    with pytest.raises(SpecError, match=pattern):  # and so does a spec holding it
        spec_from_dict({"name": "s", "space": space})


def test_a_range_the_core_refuses_is_a_spec_error_before_any_trial():
    """The space's corners are checked against the core when the spec is read."""
    with pytest.raises(SpecError, match=r"`model.K` must be at least 2"):
        spec_from_dict({"name": "s", "space": {"K": {"type": "int", "low": 1, "high": 3}}})
    with pytest.raises(SpecError, match=r"`train.batch_size` must be at least 2"):
        spec_from_dict({"name": "s", "space": {
            "batch_size": {"type": "categorical", "choices": [1, 64]}}})


def test_study_validate_prints_what_would_run_and_touches_nothing(tmp_path):
    from tests.conftest import ROOT, gmwae

    done = gmwae("study", "validate", ROOT / "studies/k-search.yaml", cwd=tmp_path, timeout=120)
    assert done.returncode == 0, done.stderr
    assert "objective: max val/ami (reads the validation split's labels)" in done.stdout
    assert "gmwae searches (inline):\n  K: int 8..20\n  paper point (enqueued first): K=10" \
        in done.stdout
    assert "fixed (every trial): eval_size=2000, pretrain_steps=200" in done.stdout
    warned = gmwae("study", "validate", ROOT / "studies/smoke.yaml", "--set",
                   "metric=val/cluster_acc", cwd=tmp_path, timeout=120)
    assert warned.returncode == 0 and "warning: the space searches K" in warned.stdout
    free = gmwae("study", "validate", ROOT / "studies/smoke.yaml", "--set", "metric=val/mmd",
                 cwd=tmp_path, timeout=120)
    assert "objective: min val/mmd (label-free: reads the validation images only)" in free.stdout
    bad = gmwae("study", "validate", ROOT / "studies/smoke.yaml", "--set",
                "space={K: {type: int, low: 8, high: 20, log: yes, step: 2}}", cwd=tmp_path,
                timeout=120)
    assert bad.returncode == 2
    assert bad.stderr.count("\n") == 1 and "`K.step` must be a positive number, and cannot go " \
        "with log: true, but got 2" in bad.stderr
    pointed = gmwae("study", "validate", ROOT / "studies/quickstart.yaml", "--set", "trials=1",
                    cwd=tmp_path, timeout=120)
    assert pointed.returncode == 0, pointed.stderr
    assert ("  then (enqueued): consistency_weight=4.0, balance_weight=1.0; other keys as at the "
            "paper point (not enqueued: trials is 1)") in pointed.stdout
    assert list(tmp_path.iterdir()) == []  # no store, no run folder
