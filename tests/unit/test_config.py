import dataclasses
import subprocess
import sys
from pathlib import Path

import pytest

from bcc_pipeline import config
from bcc_pipeline.config import DEFAULTS, ENV_VARS, PROFILES, SETTINGS, load_settings
from bcc_pipeline.errors import ConfigError

README = Path(__file__).parents[2] / "README.md"


def test_seed_profile_is_the_recipe_and_default():
    s = load_settings(env={})
    assert s.profile == "seed"
    assert (s.image_size, s.batch_size, s.epochs, s.learning_rate, s.base_weights) == (
        224,
        16,
        7,
        1e-4,
        "imagenet",
    )
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


@pytest.mark.parametrize(
    "env,match",
    [
        ({"BCC_EPOCHS": "seven"}, "BCC_EPOCHS must be int"),
        ({"BCC_EPOCHS": "0"}, "positive"),
        ({"BCC_IMAGE_SIZE": "16"}, "at least 32"),
        ({"BCC_PROFILE": "huge"}, "unknown profile"),
        ({"BCC_VAL_FRACTION": "1.5"}, "between 0 and 1"),
        ({"BCC_GATE_MIN_ACCURACY": "2"}, "between 0 and 1"),
        ({"BCC_BN_RECALIBRATION": "maybe"}, "one of auto, on, off"),
    ],
)
def test_bad_values_give_clear_errors(env, match):
    with pytest.raises(ConfigError, match=match):
        load_settings(env=env)


def test_unknown_override_is_refused():
    with pytest.raises(ConfigError, match="unknown setting"):
        load_settings(env={}, overrides={"epochz": 3})


def test_every_profile_key_is_a_setting_and_documented():
    for prof in PROFILES.values():
        assert set(prof) <= set(ENV_VARS)
    readme = README.read_text()
    for var, _t, _doc in ENV_VARS.values():
        assert f"`{var}`" in readme, f"{var} missing from the README's configuration table"


def test_readme_table_is_generated_from_the_declarations():
    text = README.read_text(encoding="utf-8")
    assert text.count(config.README_BEGIN) == 1 and text.count(config.README_END) == 1
    table = text.split(config.README_BEGIN, 1)[1].split(config.README_END, 1)[0]
    assert table == "\n" + config.markdown_table(), (
        "the README's configuration table is stale: run `python -m bcc_pipeline.config --readme README.md`"
    )


def test_update_readme_rewrites_only_between_the_markers(tmp_path):
    readme = tmp_path / "README.md"
    readme.write_text(f"# T\n\nbefore\n{config.README_BEGIN}\n| old |\n{config.README_END}\nafter\n")
    assert config.update_readme(readme) is True
    text = readme.read_text()
    assert (
        text == f"# T\n\nbefore\n{config.README_BEGIN}\n{config.markdown_table()}{config.README_END}\nafter\n"
    )
    assert config.update_readme(readme) is False and readme.read_text() == text
    readme.write_text("no markers\n")
    with pytest.raises(ConfigError, match="markers"):
        config.update_readme(readme)


def test_every_setting_is_fully_declared():
    envs = [spec.env for spec in SETTINGS.values()]
    assert len(set(envs)) == len(envs) and all(e.startswith("BCC_") for e in envs)
    assert list(SETTINGS) == [f.name for f in dataclasses.fields(config.Settings) if f.name != "sources"]
    for name, spec in SETTINGS.items():
        assert spec.name == name and ENV_VARS[name] == (spec.env, spec.type, spec.doc)
        assert spec.doc.strip() and "\n" not in spec.doc, f"{name} needs a one-line doc"
        assert isinstance(spec.default, spec.type), name
        assert not isinstance(spec.default, bool) or spec.type is bool, (
            name
        )  # no True where a number is meant
        assert DEFAULTS[name] == spec.default == getattr(config.Settings(), name)
        if spec.choices:
            assert spec.type is str and spec.default in spec.choices, name
        assert spec.problem(spec.default) is None, f"{name}'s default breaks its own rule"


def test_profiles_name_only_declared_settings_with_valid_values():
    assert tuple(PROFILES) == SETTINGS["profile"].choices
    assert PROFILES["seed"] == {n: s.default for n, s in SETTINGS.items() if s.recipe}
    for profile, values in PROFILES.items():
        assert set(values) <= set(SETTINGS)
        for name, value in values.items():
            spec = SETTINGS[name]
            assert isinstance(value, spec.type) and spec.problem(value) is None, (profile, name)
        assert load_settings(profile, env={}).sources["epochs"] == "profile"


def test_training_params_are_the_recorded_settings():
    s = load_settings(env={})
    assert s.training_params() == {
        "profile": "seed",
        "base_weights": "imagenet",
        "image_size": 224,
        "batch_size": 16,
        "epochs": 7,
        "learning_rate": 1e-4,
        "seed": 42,
        "val_fraction": 0.2,
        "bn_recalibration": "auto",
        "target_sensitivity": 0.95,
    }
    assert set(s.as_dict()) == set(SETTINGS) and s.as_dict()["home"] == str(s.home)


@pytest.mark.parametrize(
    "name", [n for n, s in SETTINGS.items() if s.minimum is not None or s.maximum is not None]
)
def test_every_bound_is_enforced_with_the_variable_named(name):
    spec = SETTINGS[name]
    below = spec.minimum if spec.exclusive else spec.minimum - 1 if spec.minimum is not None else None
    above = spec.maximum if spec.exclusive else spec.maximum + 1 if spec.maximum is not None else None
    for bad in (v for v in (below, above) if v is not None):
        with pytest.raises(ConfigError, match=rf"^{spec.env}=.*: must be {spec.rule}") as err:
            load_settings(env={spec.env: f"{int(bad):o}" if spec.octal else str(spec.type(bad))})
        assert "\n" not in str(err.value)


@pytest.mark.parametrize("name", [n for n, s in SETTINGS.items() if s.type is float])
@pytest.mark.parametrize("raw", ["nan", "inf", "-inf", "NaN", "1e999"])
def test_a_number_setting_refuses_values_that_are_not_finite(name, raw):
    """``BCC_SETTLE_SECONDS=nan`` compared false with every bound and was taken: every inbox file was
    then skipped forever while each run looked finished."""
    env = SETTINGS[name].env
    with pytest.raises(ConfigError, match=rf"^{env}=.*: must be a finite number"):
        load_settings(env={env: raw})


@pytest.mark.parametrize(
    "env,message",
    [
        ({"BCC_LEARNING_RATE": "0"}, "BCC_LEARNING_RATE=0.0: must be greater than 0"),
        ({"BCC_SETTLE_SECONDS": "-1"}, "BCC_SETTLE_SECONDS=-1.0: must be between 0 and 86400"),
        (
            {"BCC_INFERENCE": "gpu"},
            "BCC_INFERENCE='gpu': must be one of auto, keras, xla, keras-bf16, openvino",
        ),
    ],
)
def test_error_messages_name_the_variable(env, message):
    with pytest.raises(ConfigError) as err:
        load_settings(env=env)
    assert str(err.value).startswith(message)


def test_blank_base_weights_is_refused_with_a_hint():
    with pytest.raises(ConfigError, match="BCC_BASE_WEIGHTS='  ': must be non-blank \\(use imagenet, none"):
        load_settings(env={}, overrides={"base_weights": "  "})


def test_backends_are_declared_here_and_reexported_by_inference():
    from bcc_pipeline import inference

    assert inference.BACKENDS is config.BACKENDS and inference.DEFAULT_BACKEND == config.DEFAULT_BACKEND
    assert DEFAULTS["inference"] == config.DEFAULT_INFERENCE == "auto"
    assert SETTINGS["inference"].choices == ("auto", *config.BACKENDS)
    assert config.DEFAULT_BACKEND == config.REFERENCE_BACKEND == "keras"


def test_importing_config_imports_nothing_heavy():
    code = (
        "import sys, bcc_pipeline.config; "
        "print(' '.join(sorted({m.split('.')[0] for m in sys.modules} "
        "| {m for m in sys.modules if m.startswith('bcc_pipeline')})))"
    )
    loaded = set(
        subprocess.run(
            [sys.executable, "-c", code], check=True, capture_output=True, text=True
        ).stdout.split()
    )
    assert "bcc_pipeline.config" in loaded
    heavy = {
        "tensorflow",
        "keras",
        "numpy",
        "sqlalchemy",
        "PIL",
        "cv2",
        "pandas",
        "sklearn",
        "bcc_pipeline.inference",
        "bcc_pipeline.model",
        "bcc_pipeline.images",
    }
    assert not loaded & heavy, loaded & heavy


def test_module_main_prints_the_table_and_updates_a_readme(tmp_path, capsys):
    assert config.main([]) == 0
    assert capsys.readouterr().out == config.markdown_table()
    readme = tmp_path / "README.md"
    readme.write_text(f"{config.README_BEGIN}\n{config.README_END}\n")
    assert config.main(["--readme", str(readme)]) == 0
    assert config.markdown_table() in readme.read_text()


@pytest.mark.parametrize(
    ("raw", "value"),
    [
        ("1", True),
        ("yes", True),
        ("ON", True),
        ("true", True),
        ("0", False),
        ("no", False),
        ("off", False),
        ("False", False),
    ],
)
def test_a_boolean_setting_reads_the_usual_words(raw, value):
    assert config.load_settings(env={"BCC_REQUIRE_APPROVAL": raw}).require_approval is value


def test_a_boolean_setting_refuses_other_words():
    with pytest.raises(ConfigError, match="BCC_REQUIRE_APPROVAL must be a boolean"):
        config.load_settings(env={"BCC_REQUIRE_APPROVAL": "maybe"})


def test_publish_backends_is_a_list_of_known_back_ends():
    assert load_settings(env={"BCC_PUBLISH_BACKENDS": "all"}).publish_backend_list == config.BACKENDS
    assert load_settings(env={"BCC_PUBLISH_BACKENDS": "none"}).publish_backend_list == ()
    got = load_settings(env={"BCC_PUBLISH_BACKENDS": "openvino, openvino-bf16,openvino"}).publish_backend_list
    assert got == ("openvino", "openvino-bf16")
    with pytest.raises(ConfigError, match="BCC_PUBLISH_BACKENDS='openvino,tpu': 'tpu' is not a back-end"):
        load_settings(env={"BCC_PUBLISH_BACKENDS": "openvino,tpu"})
