import json

import numpy as np
import pytest


def _tiny_bn_model(size=16):
    import keras

    keras.utils.set_random_seed(0)
    inp = keras.Input((size, size, 3))
    x = keras.layers.Conv2D(4, 3, padding="same", name="conv")(inp)
    x = keras.layers.BatchNormalization(name="bn1")(x)
    x = keras.layers.ReLU()(x)
    x = keras.layers.GlobalAveragePooling2D()(x)
    x = keras.layers.Dropout(0.5, name="drop")(x)
    x = keras.layers.BatchNormalization(name="bn2")(x)
    out = keras.layers.Dense(2, activation="softmax")(x)
    return keras.Model(inp, out)


def _data(n=64, size=16, seed=0):
    rng = np.random.default_rng(seed)
    y = np.arange(n) % 2
    x = rng.normal(loc=3.0, scale=1.0, size=(n, size, size, 3)).astype("float32")
    x[y == 1] += 2.0  # brighter = malignant
    return x, y


def test_recalibration_re_estimates_moving_statistics_without_training():
    import tensorflow as tf

    from bcc_pipeline.training import recalibrate_batchnorm

    net = _tiny_bn_model()
    x, _ = _data()
    kernel_before = np.asarray(net.get_layer("conv").kernel).copy()
    bn1 = net.get_layer("bn1")
    assert np.allclose(np.asarray(bn1.moving_mean), 0.0)  # the from-scratch state
    steps = recalibrate_batchnorm(net, tf.data.Dataset.from_tensor_slices(x).batch(16))
    assert steps == 4  # one pass is enough: the running mean of the batch statistics
    conv_out = np.asarray(net.get_layer("conv")(x))
    np.testing.assert_allclose(
        np.asarray(bn1.moving_mean), conv_out.mean(axis=(0, 1, 2)), rtol=1e-4, atol=1e-4
    )
    np.testing.assert_allclose(np.asarray(bn1.moving_variance), conv_out.var(axis=(0, 1, 2)), rtol=0.05)
    np.testing.assert_array_equal(np.asarray(net.get_layer("conv").kernel), kernel_before)
    assert bn1.momentum == 0.99 and net.get_layer("drop").rate == 0.5  # restored


def test_recalibration_needs_data():
    import tensorflow as tf

    from bcc_pipeline.training import recalibrate_batchnorm

    empty = tf.data.Dataset.from_tensor_slices(np.zeros((0, 16, 16, 3), "float32")).batch(4)
    with pytest.raises(ValueError, match="empty"):
        recalibrate_batchnorm(_tiny_bn_model(), empty)


def test_fit_keeps_best_checkpoint_logs_progress_and_saves_history(tmp_path):
    import tensorflow as tf

    from bcc_pipeline.training import fit, predict_malignant

    x, y = _data(96)
    onehot = np.eye(2, dtype="float32")[y]
    train = tf.data.Dataset.from_tensor_slices((x[:64], onehot[:64])).shuffle(64, seed=1).batch(16)
    val = tf.data.Dataset.from_tensor_slices((x[64:], onehot[64:])).batch(16)
    recal = tf.data.Dataset.from_tensor_slices(x[:64]).batch(16)
    messages: list[str] = []
    net = _tiny_bn_model()
    result = fit(
        net,
        train,
        val,
        epochs=3,
        learning_rate=1e-2,
        workdir=tmp_path,
        recalibration_ds=recal,
        steps_per_epoch=4,
        progress=messages.append,
    )
    assert set(result.history) >= {"loss", "accuracy", "val_loss", "val_accuracy"}
    assert len(result.history["val_loss"]) == 3
    assert result.best_val_loss == min(result.history["val_loss"])
    assert result.recalibrated
    assert json.loads((tmp_path / "history.json").read_text()) == result.history
    assert sum(m.startswith("epoch ") for m in messages) == 3 and "restored" in messages[-1]
    # the model now holds the best epoch's weights: its validation loss is the best one recorded
    again = net.evaluate(val, verbose=0, return_dict=True)
    assert again["loss"] == pytest.approx(result.best_val_loss, rel=1e-4)
    probs = predict_malignant(net, tf.data.Dataset.from_tensor_slices(x[64:]).batch(8))
    assert probs.shape == (32,) and ((probs >= 0) & (probs <= 1)).all()
    assert ((probs >= 0.5) == y[64:]).mean() >= 0.9  # learnable data, usable inference mode


def test_fit_replaces_history_json_atomically(tmp_path):
    """A reader of the previous history.json (a retried task's, say) keeps reading it whole: the new
    file replaces it instead of being written into it."""
    import tensorflow as tf

    from bcc_pipeline.training import fit

    previous = json.dumps({"loss": [9.0] * 500}) + "\n"
    (tmp_path / "history.json").write_text(previous)
    x, y = _data(32)
    onehot = np.eye(2, dtype="float32")[y]
    ds = tf.data.Dataset.from_tensor_slices((x, onehot)).batch(16)
    with open(tmp_path / "history.json") as reader:
        result = fit(
            _tiny_bn_model(), ds, ds, epochs=1, learning_rate=1e-2, workdir=tmp_path, progress=lambda _: None
        )
        assert reader.read() == previous
    assert json.loads((tmp_path / "history.json").read_text()) == result.history
    assert sorted(p.name for p in tmp_path.iterdir()) == ["best.weights.h5", "history.json"]


def test_fit_rejects_zero_epochs(tmp_path):
    from bcc_pipeline.training import fit

    with pytest.raises(ValueError, match="epochs"):
        fit(_tiny_bn_model(), None, None, epochs=0, learning_rate=1e-3, workdir=tmp_path)


def test_fused_adam_matches_keras_adam():
    """Same update rule: on a problem without near-zero gradients (where Adam's m/sqrt(v) turns
    rounding noise into full-size steps) the weights agree to float tolerance after 10 steps."""
    import keras
    import tensorflow as tf

    from bcc_pipeline.fused_adam import FusedAdam

    rng = np.random.default_rng(0)
    x = rng.normal(size=(160, 8)).astype("float32")
    y = (x @ rng.normal(size=(8, 3)) + 3.0).astype("float32")
    results = []
    for opt in (keras.optimizers.Adam(learning_rate=1e-2), FusedAdam(learning_rate=1e-2)):
        keras.utils.set_random_seed(1)
        net = keras.Sequential(
            [keras.Input((8,)), keras.layers.Dense(16, activation="tanh"), keras.layers.Dense(3)]
        )
        start = [np.asarray(w).copy() for w in net.weights]
        net.compile(optimizer=opt, loss="mse")
        net.fit(tf.data.Dataset.from_tensor_slices((x, y)).batch(16), epochs=1, verbose=0, shuffle=False)
        results.append([np.asarray(w) for w in net.weights])
        assert int(opt.iterations) == 10
    for a, b in zip(*results, strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)
    assert not all(np.allclose(a, s0) for a, s0 in zip(results[1], start, strict=True))  # it did train
