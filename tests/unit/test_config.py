from pathlib import Path

import pytest

from bcc_pipeline.config import ENV_VARS, PROFILES, load_settings
from bcc_pipeline.errors import ConfigError


def test_seed_profile_is_the_recipe_and_default():
    s = load_settings(env={})
    assert s.profile == "seed"
    assert (s.image_size, s.batch_size, s.epochs, s.learning_rate, s.base_weights) == (224, 16, 7, 1e-4, "imagenet")
    assert s.val_fraction == 0.2 and s.target_sensitivity == 0.95


def test_demo_profile_keeps_recipe_but_is_smaller():
    s = load_settings("demo", env={})
    assert s.image_size < 224 and s.epochs < 7
    assert (s.batch_size, s.learning_rate) == (16, 1e-4)
    assert s.from_scratch


def test_precedence_profile_then_env_then_override(tmp_path):
    env = {"BCC_PROFILE": "demo", "BCC_EPOCHS": "3", "BCC_IMAGE_SIZE": "64", "BCC_HOME": str(tmp_path)}
    s = load_settings(env=env)
    assert (s.profile, s.epochs, s.image_size) == ("demo", 3, 64)
    assert s.sources["epochs"] == "env" and s.sources["batch_size"] == "profile"
    s = load_settings(env=env, overrides={"epochs": 1, "image_size": None})
    assert (s.epochs, s.image_size) == (1, 64)
    assert s.sources["epochs"] == "override"
    # an explicit profile beats BCC_PROFILE, env still beats the profile
    s = load_settings("seed", env=env)
    assert (s.profile, s.epochs, s.batch_size) == ("seed", 3, 16)


def test_database_defaults_to_sqlite_in_home(tmp_path):
    s = load_settings(env={"BCC_HOME": str(tmp_path / "h")})
    assert s.home == (tmp_path / "h").resolve()
    assert s.database_url == f"sqlite:///{tmp_path / 'h' / 'bcc.db'}"
    assert s.inbox_dir == s.home / "inbox" and s.models_dir == s.home / "models"


def test_settings_are_frozen():
    s = load_settings(env={})
    with pytest.raises(AttributeError):
        s.epochs = 3  # type: ignore[misc]


@pytest.mark.parametrize("env,match", [
    ({"BCC_EPOCHS": "seven"}, "BCC_EPOCHS must be int"),
    ({"BCC_EPOCHS": "0"}, "positive"),
    ({"BCC_IMAGE_SIZE": "16"}, "at least 32"),
    ({"BCC_PROFILE": "huge"}, "unknown profile"),
    ({"BCC_VAL_FRACTION": "1.5"}, "between 0 and 1"),
    ({"BCC_GATE_MIN_ACCURACY": "2"}, "between 0 and 1"),
    ({"BCC_BN_RECALIBRATION": "maybe"}, "one of auto, on, off"),
])
def test_bad_values_give_clear_errors(env, match):
    with pytest.raises(ConfigError, match=match):
        load_settings(env=env)


def test_unknown_override_is_refused():
    with pytest.raises(ConfigError, match="unknown setting"):
        load_settings(env={}, overrides={"epochz": 3})


def test_every_profile_key_is_a_setting_and_documented():
    for prof in PROFILES.values():
        assert set(prof) <= set(ENV_VARS)
    readme = (Path(__file__).parents[2] / "README.md").read_text()
    for var, _t, _doc in ENV_VARS.values():
        assert f"`{var}`" in readme, f"{var} missing from the README's configuration table"
