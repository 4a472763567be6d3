"""Grad-CAM heatmaps (Selvaraju et al. 2017) for the patient models, on every Keras backend.

For a class ``c`` and an eye, the heatmap is ``ReLU(sum_k alpha_k A_k)``, where ``A`` is the
feature map of the backbone's last convolutional block (the input of its global average
pooling) for that eye and ``alpha_k`` the spatial mean of the gradient of the class's logit
with respect to ``A_k``. The gradient runs through the patient head (pooling, the two-eye
fusion, the dense layer), so an eye gets credit for what it adds to the patient's decision.

Keras 3 has no backend-neutral gradient, so :func:`_gradients` asks the backend's own
autodiff (``tf.GradientTape``, ``jax.grad``); everything else is
``keras.ops``.
"""

from __future__ import annotations

from collections.abc import Callable

import cv2
import keras
import numpy as np
from keras import ops

from ..data.imaging import BORDER_LEVEL
from ..errors import FundusError
from ..labels import INPUT_NAMES
from ..models.forward import forward


class GradCam:
    """Grad-CAM of one patient model (:func:`..models.build_patient_model`)."""

    def __init__(self, model: keras.Model):
        try:
            encoder = model.get_layer("eye_encoder")
            preprocess = encoder.get_layer("preprocess")
            self.fusion = model.get_layer("fuse_eyes")
            self.dense = model.get_layer("labels")
        except ValueError as exc:
            raise FundusError(f"Grad-CAM needs a patient model of this library ({exc})") from None
        nets = [layer for layer in encoder.layers if isinstance(layer, keras.Model)]
        if len(nets) != 1 or not isinstance(nets[0].layers[-1], keras.layers.GlobalAveragePooling2D):
            raise FundusError("Grad-CAM needs a backbone that ends in global average pooling")
        net = nets[0]
        pool = net.layers[-1]
        # the input of the pooling is the last convolutional block's output, at stride 32
        self.layer_name = net.layers[-2].name
        maps = keras.Model(net.inputs, pool.input, name="last_conv_maps")
        self.image_maps = keras.Model(encoder.input, maps(preprocess(encoder.input)), name="image_maps")
        self.model = model

    def feature_maps(self, images: np.ndarray) -> np.ndarray:
        """(batch, h, w, channels) maps of RGB [0, 255] images at the model's input size."""
        return forward(self.image_maps, images)

    @staticmethod
    def pooled(maps: np.ndarray) -> np.ndarray:
        """The backbone's pooled features of :meth:`feature_maps`' maps: the same numbers its global
        average pooling gives, so one pass through the backbone serves the heads and the heatmaps."""
        return np.asarray(maps, np.float32).mean(axis=(1, 2))

    def head(self) -> tuple[np.ndarray, np.ndarray]:
        """The patient head's kernel on concat(max, mean) of the eyes, and its bias."""
        kernel, bias = self.dense.get_weights()
        return np.asarray(kernel, np.float32), np.asarray(bias, np.float32)

    def logits(self, maps_left, maps_right, head: tuple[np.ndarray, np.ndarray] | None = None):
        """The class logits of a head on concat(max, mean) of both eyes' pooled maps (inference
        mode); ``head`` (kernel, bias), default the patient model's own."""
        pooled = ops.concatenate([ops.mean(maps_left, axis=(1, 2)), ops.mean(maps_right, axis=(1, 2))], axis=0)
        fused = self.fusion(pooled)
        kernel, bias = (self.dense.kernel, self.dense.bias) if head is None else head
        return ops.matmul(fused, ops.convert_to_tensor(kernel)) + ops.convert_to_tensor(bias)

    def heatmaps(
        self, left: np.ndarray, right: np.ndarray, classes: list[int], same_eye: np.ndarray | None = None
    ) -> tuple[np.ndarray, np.ndarray]:
        """Heatmaps at feature-map resolution, shape (len(classes), batch, 2 eyes, h, w), and the probabilities.

        ``same_eye[i]`` marks a one-eyed patient fed the same photo as both eyes: both copies'
        gradients then belong to that one photo.
        """
        maps_left, maps_right = self.feature_maps(left), self.feature_maps(right)
        probs = np.asarray(ops.convert_to_numpy(ops.sigmoid(self.logits(maps_left, maps_right))), np.float64)
        expected = np.asarray(
            self.model.predict_on_batch(
                {INPUT_NAMES[0]: left.astype(np.float32), INPUT_NAMES[1]: right.astype(np.float32)}
            )
        )
        if (
            np.max(np.abs(probs - expected)) > 5e-3
        ):  # the head was rebuilt by hand: prove it is the model's (float32 noise aside)
            raise FundusError(
                "Grad-CAM's reconstruction of the model head does not reproduce its probabilities "
                f"(max difference {np.max(np.abs(probs - expected)):.2e})"
            )
        return self.heatmaps_of_maps(maps_left, maps_right, classes, same_eye), probs

    def heatmaps_of_maps(
        self,
        maps_left: np.ndarray,
        maps_right: np.ndarray,
        classes: list[int],
        same_eye: np.ndarray | None = None,
        head: tuple[np.ndarray, np.ndarray] | None = None,
    ) -> np.ndarray:
        """:meth:`heatmaps` from maps already computed (:meth:`feature_maps`), through ``head``
        (kernel, bias on concat(max, mean); default the model's): a one-eyed patient's decision made
        by another head is explained through that head."""
        same = np.zeros(len(maps_left), bool) if same_eye is None else np.asarray(same_eye, bool)
        out = np.zeros((len(classes), len(maps_left), 2, *maps_left.shape[1:3]), np.float32)
        for i, c in enumerate(classes):
            grad_left, grad_right = _gradients(
                lambda a, b, c=c: ops.sum(self.logits(a, b, head)[:, c]), maps_left, maps_right
            )
            alpha_left, alpha_right = grad_left.mean(axis=(1, 2)), grad_right.mean(axis=(1, 2))
            alpha_left[same] += alpha_right[same]
            alpha_right[same] = alpha_left[same]
            out[i, :, 0] = np.maximum(np.einsum("bhwk,bk->bhw", maps_left, alpha_left), 0)
            out[i, :, 1] = np.maximum(np.einsum("bhwk,bk->bhw", maps_right, alpha_right), 0)
        return out


def _gradients(fn: Callable, a: np.ndarray, b: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Gradients of the scalar ``fn(a, b)`` with respect to ``a`` and ``b``, by the backend's autodiff."""
    backend = keras.backend.backend()
    if backend == "tensorflow":
        import tensorflow as tf

        ta, tb = tf.convert_to_tensor(a), tf.convert_to_tensor(b)
        with tf.GradientTape() as tape:
            tape.watch([ta, tb])
            value = fn(ta, tb)
        grads = tape.gradient(value, [ta, tb])
    elif backend == "jax":
        import jax

        grads = jax.grad(fn, argnums=(0, 1))(jax.numpy.asarray(a), jax.numpy.asarray(b))
    else:
        raise FundusError(
            f"Grad-CAM is implemented for the tensorflow and jax Keras backends, not {backend!r}; "
            "set KERAS_BACKEND=tensorflow or jax"
        )
    return tuple(np.asarray(ops.convert_to_numpy(g), np.float32) for g in grads)


def ensemble_heatmaps(
    per_view: dict[str, np.ndarray], size: int, weights: dict[str, float] | None = None
) -> np.ndarray:
    """Average the view models' heatmaps as the ensemble averages probabilities.

    Each view's (classes, batch, 2, h, w) maps are resized to ``size`` and scaled so that a
    patient's hottest pixel over both eyes is 1 (the views' gradients are on different scales);
    the result is in [0, 1], shape (classes, batch, 2, size, size).
    """
    weights = weights or {view: 1.0 for view in per_view}
    total = None
    for view, maps in per_view.items():
        n_classes, batch, eyes, h, w = maps.shape
        flat = maps.reshape(-1, h, w)
        resized = np.stack([cv2.resize(m, (size, size), interpolation=cv2.INTER_LINEAR) for m in flat])
        resized = np.maximum(resized.reshape(n_classes, batch, eyes, size, size), 0)
        peak = resized.max(axis=(2, 3, 4), keepdims=True)
        scaled = np.divide(resized, peak, out=np.zeros_like(resized), where=peak > 0) * weights[view]
        total = scaled if total is None else total + scaled
    return (total / sum(weights.values())).astype(np.float32)


def overlay(photo_bgr: np.ndarray, heatmap: np.ndarray, strength: float = 0.45) -> np.ndarray:
    """The heatmap ([0, 1]) in the JET colours over a BGR photo, weighted by the heat itself, and
    only inside the retina: the black border around it is no evidence, whatever the coarse map says."""
    heat = cv2.resize(heatmap, photo_bgr.shape[1::-1], interpolation=cv2.INTER_LINEAR)
    heat = heat * (photo_bgr.max(axis=2) > BORDER_LEVEL)  # crop_to_fov's own test for the retina
    colour = cv2.applyColorMap(np.uint8(np.clip(heat, 0, 1) * 255), cv2.COLORMAP_JET).astype(np.float32)
    weight = strength * np.clip(heat, 0, 1)[..., None]
    return np.uint8(np.clip(photo_bgr.astype(np.float32) * (1 - weight) + colour * weight, 0, 255))
