"""Input reconstruction from the activations a server receives: a decoder trained on
auxiliary data the server could hold.

The attacker holds auxiliary samples from the device's distribution and their activations
(query access to the head, e.g. through the published app bundle; the strongest
honest-but-curious setting of model-inversion attacks). It fits a decoder (an MLP,
activation -> input, mean squared error) on them, then applies it to the activations it
received for the device's own samples. Reported on those held-out samples: the MSE, the
SSIM (images in [0, 1]; a 7x7 Gaussian window, sigma 1.5, `tf.image.ssim`) and, for
scale, the MSE of guessing the auxiliary mean for every sample.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import keras
import numpy as np
import tensorflow as tf

__all__ = ["train_decoder", "reconstruction_scores", "save_pictures"]


def train_decoder(activations: Any, inputs: Any, *, epochs: int = 60, seed: int = 0,
                  width: int = 256) -> keras.Model:
    """An MLP decoder from activations (flattened) to inputs (flattened), fitted with MSE."""
    a = np.asarray(activations, np.float32).reshape(len(activations), -1)
    x = np.asarray(inputs, np.float32).reshape(len(inputs), -1)
    keras.utils.set_random_seed(seed)
    decoder = keras.Sequential([keras.Input((a.shape[1],)), keras.layers.Dense(width, activation="relu"),
                                keras.layers.Dense(width, activation="relu"), keras.layers.Dense(x.shape[1])],
                               name="attack_decoder")
    decoder.compile(optimizer=keras.optimizers.Adam(1e-3), loss="mse")
    decoder.fit(a, x, epochs=epochs, batch_size=64, verbose=0)
    return decoder


def reconstruction_scores(decoder: keras.Model, activations: Any, inputs: Any, *,
                          image_shape: tuple[int, ...] | None = None, value_range: float = 1.0,
                          aux_mean: Any = None) -> tuple[dict[str, float], np.ndarray]:
    """(MSE, SSIM when `image_shape` is given, the mean-guess MSE; the reconstructions)."""
    a = np.asarray(activations, np.float32).reshape(len(activations), -1)
    x = np.asarray(inputs, np.float32).reshape(len(inputs), -1)
    guess = np.asarray(decoder.predict(a, verbose=0, batch_size=256), np.float32)
    scores = {"mse": float(np.mean((guess - x) ** 2))}
    if aux_mean is not None:
        scores["mse_mean_guess"] = float(np.mean((np.asarray(aux_mean).reshape(1, -1) - x) ** 2))
    if image_shape is not None:
        height, width = image_shape[:2]
        channels = image_shape[2] if len(image_shape) > 2 else 1
        shape = (-1, height, width, channels)
        original = tf.clip_by_value(x.reshape(shape) / value_range, 0.0, 1.0)
        rebuilt = tf.clip_by_value(guess.reshape(shape) / value_range, 0.0, 1.0)
        size = min(7, height, width)
        scores["ssim"] = float(tf.reduce_mean(tf.image.ssim(original, rebuilt, max_val=1.0, filter_size=size,
                                                            filter_sigma=1.5)))
    return scores, guess


def save_pictures(path: str | Path, originals: Any, reconstructions: Any, image_shape: tuple[int, ...],
                  title: str = "", count: int = 8) -> Path:
    """A PNG: originals (top row) above their reconstructions (bottom row)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:  # pragma: no cover - depends on the environment
        from splitkeras.errors import SplitKerasError

        raise SplitKerasError("Saving pictures needs matplotlib: pip install matplotlib") from None
    count = min(count, len(originals))
    figure, axes = plt.subplots(2, count, figsize=(1.2 * count, 2.8), squeeze=False)
    for column in range(count):
        for row, images in enumerate((originals, reconstructions)):
            axis = axes[row][column]
            axis.imshow(np.asarray(images[column]).reshape(image_shape[:2]), cmap="gray")
            axis.set_xticks([])
            axis.set_yticks([])
    axes[0][0].set_ylabel("device")
    axes[1][0].set_ylabel("attack")
    if title:
        figure.suptitle(title, fontsize=9)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=80, bbox_inches="tight")
    plt.close(figure)
    return path
