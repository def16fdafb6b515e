import json
import os

import numpy as np
import pytest

from bcc_pipeline import model
from bcc_pipeline.errors import ArtifactError, ChecksumMismatchError, ConfigError, WeightsUnavailableError
from bcc_pipeline.files import sha256_file


@pytest.fixture(scope="module")
def small_model():
    return model.build_classifier(image_size=32, base_weights="none", seed=1)


def test_seed_architecture_has_the_seed_parameter_counts():
    net = model.build_classifier(image_size=224, base_weights="none")
    assert model.count_params(net) == {
        "total_params": 18_333_506,
        "trainable_params": 18_100_610,
        "non_trainable_params": 232_896,
    }
    assert [layer.name for layer in net.layers] == ["image", "densenet201", "gap", "dropout", "bn", "probs"]
    assert net.get_layer("dropout").rate == 0.5
    assert net.output_shape == (None, 2)


def test_small_input_builds_and_outputs_probabilities(small_model):
    x = np.zeros((3, 32, 32, 3), dtype="float32")
    p = small_model.predict(x, verbose=0)
    assert p.shape == (3, 2)
    np.testing.assert_allclose(p.sum(axis=1), 1.0, rtol=1e-5)


def test_bad_image_size():
    with pytest.raises(ConfigError, match=">= 32"):
        model.build_classifier(image_size=16, base_weights="none")


def test_offline_imagenet_fails_fast_with_the_way_out(tmp_path, monkeypatch):
    monkeypatch.setenv("KERAS_HOME", str(tmp_path / "empty-keras"))
    if model._network_reachable():
        pytest.skip("the network is reachable here, so Keras could download the weights")
    with pytest.raises(WeightsUnavailableError) as exc:
        model.resolve_base_weights("imagenet")
    msg = str(exc.value)
    assert model.IMAGENET_WEIGHTS_FILE in msg
    assert str(tmp_path / "empty-keras" / "models") in msg
    assert "BCC_BASE_WEIGHTS=none" in msg and "BCC_BASE_WEIGHTS=/path/to/" in msg


def test_imagenet_from_cache_path_is_accepted(tmp_path, monkeypatch):
    cache = tmp_path / "k" / "models"
    cache.mkdir(parents=True)
    (cache / model.IMAGENET_WEIGHTS_FILE).write_bytes(b"placeholder")
    monkeypatch.setenv("KERAS_HOME", str(tmp_path / "k"))
    assert model.resolve_base_weights("imagenet") == "imagenet"


def test_weights_file_path_is_loaded_into_the_base(tmp_path):
    import keras

    base = keras.applications.DenseNet201(include_top=False, weights=None, input_shape=(32, 32, 3))
    for w in base.weights[:3]:
        w.assign(np.full(w.shape, 0.123, dtype="float32"))
    path = tmp_path / "base.weights.h5"
    base.save_weights(path)
    net = model.build_classifier(image_size=32, base_weights=str(path))
    first = net.get_layer("densenet201").weights[0]
    np.testing.assert_allclose(np.asarray(first), 0.123)


def test_missing_weights_file(tmp_path):
    with pytest.raises(WeightsUnavailableError, match="does not exist"):
        model.resolve_base_weights(str(tmp_path / "nope.h5"))


def test_artifact_round_trip_and_checksum(tmp_path, small_model):
    path, digest = model.save_artifact(small_model, tmp_path / "v1", {"version": "v1"})
    assert path.name == "model.keras" and digest == sha256_file(path)
    meta = json.loads((tmp_path / "v1" / "metadata.json").read_text())
    assert meta["artifact_sha256"] == digest and meta["version"] == "v1"
    assert not [p for p in os.listdir(tmp_path / "v1") if p.startswith(".")]  # no temp files left
    loaded = model.load_artifact(path)
    x = np.random.default_rng(0).normal(size=(2, 32, 32, 3)).astype("float32")
    np.testing.assert_allclose(loaded.predict(x, verbose=0), small_model.predict(x, verbose=0), atol=1e-5)


def test_tampered_artifact_is_refused(tmp_path, small_model):
    path, digest = model.save_artifact(small_model, tmp_path / "v1", {})
    with open(path, "ab") as fh:
        fh.write(b"tampered")
    with pytest.raises(ChecksumMismatchError, match="refusing to load"):
        model.load_artifact(path)
    with pytest.raises(ChecksumMismatchError):
        model.load_artifact(path, digest)


def test_an_artifact_swapped_between_its_check_and_its_load_is_never_loaded(
    tmp_path, small_model, monkeypatch
):
    """The model file is replaced right before Keras opens it (after the checksum was taken): what is
    loaded is still the checked bytes, never the replacement (which a conversion would then cache)."""
    import keras

    path, _ = model.save_artifact(small_model, tmp_path / "v1", {})
    real = keras.models.load_model

    def swapped_first(where, **kw):
        path.write_bytes(b"a tampered model")  # lands after the check
        return real(where, **kw)

    monkeypatch.setattr(keras.models, "load_model", swapped_first)
    loaded = model.load_artifact(path)
    x = np.random.default_rng(0).normal(size=(2, 32, 32, 3)).astype("float32")
    np.testing.assert_allclose(loaded.predict(x, verbose=0), small_model.predict(x, verbose=0), atol=1e-5)
    assert path.read_bytes() == b"a tampered model"


def test_missing_artifact_or_metadata(tmp_path, small_model):
    with pytest.raises(ArtifactError, match="does not exist"):
        model.load_artifact(tmp_path / "none" / "model.keras")
    path, _ = model.save_artifact(small_model, tmp_path / "v2", {})
    (tmp_path / "v2" / "metadata.json").unlink()
    with pytest.raises(ArtifactError, match="no recorded checksum"):
        model.load_artifact(path)
