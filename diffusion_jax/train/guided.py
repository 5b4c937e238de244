"""A trained diffusion model plus a trained noise-conditional classifier -> a jitted, classifier-guided sampler.

    clf = load_noisy_classifier(DIR)
    sample = make_classifier_guided_sample_fn(graphdef, schedule, SamplerSpec("ddim", steps=50), (N, H, W, C),
                                              clf, scale=3.0, num_classes=10)
    images, nfe = sample(params, jax.random.PRNGKey(0), labels)

Like `sampling.make_sample_fn`, with the conditional network branch wrapped by `classifier_guided`; with
spec.guidance_scale != 1 classifier-free guidance runs on top (its conditional branch is the guided one).
`unconditional_model=True` gives the diffusion network the null class, so only the classifier steers (Dhariwal &
Nichol's unconditional-model setting).
"""
from __future__ import annotations

import jax.numpy as jnp
import numpy as np

from diffusion_jax.inference.guidance.wrapper import check_scale, classifier_guided
from diffusion_jax.inference.sampling import SamplerSpec, make_sample_fn
from diffusion_jax.train.classifier import TrainedClassifier


def check_classifier_fits(classifier: TrainedClassifier, image_shape, num_classes: int | None,
                          flag: str = "--classifier") -> None:
    """ValueError naming `flag` unless the classifier reads the model's images and, for a class-conditional model,
    has its number of classes."""
    want = tuple(int(d) for d in image_shape)
    if classifier.spec.image_shape != want:
        raise ValueError(f"{flag}: the classifier reads {classifier.spec.image_shape} images, the model makes {want}")
    if num_classes is not None and classifier.spec.num_classes != num_classes:
        raise ValueError(f"{flag}: the classifier has {classifier.spec.num_classes} classes, the model "
                         f"model.num_classes={num_classes}")


def make_classifier_guided_sample_fn(graphdef, schedule, spec: SamplerSpec, shape: tuple[int, ...],
                                     classifier: TrainedClassifier, scale: float, *, prediction: str = "eps",
                                     learn_sigma: bool = False, num_classes: int | None = None,
                                     unconditional_model: bool = False, mesh=None):
    """Returns `sample(params, key, y) -> (images (N,H,W,C), nfe)`; y (N,) int labels the classifier steers to
    (and, unless unconditional_model, the class-conditional network's labels). Compiled once per shape; mesh
    splits the batch as in `sampling.make_sample_fn`, whose `condition` hook this fills."""
    scale = check_scale(scale, "--classifier-scale")
    check_classifier_fits(classifier, shape[1:], num_classes)
    if unconditional_model and (num_classes is None or spec.guidance_scale != 1.0):
        raise ValueError("unconditional_model needs a class-conditional model (model.num_classes) and no "
                         "classifier-free guidance (guidance_scale 1)")
    null = None if num_classes is None else jnp.full(shape[:1], num_classes, jnp.int32)

    def condition(net, y, classifier_params):
        model_label = null if unconditional_model or num_classes is None else y
        return classifier_guided(net(model_label), classifier.log_prob_fn(classifier_params), y, schedule, scale,
                                 prediction=prediction)

    sample = make_sample_fn(graphdef, schedule, spec, shape, prediction=prediction, learn_sigma=learn_sigma,
                            num_classes=num_classes, mesh=mesh, condition=condition)

    def run(params, key, y):
        y = np.asarray(y)
        if y.shape != shape[:1] or not np.issubdtype(y.dtype, np.integer) or y.min() < 0 \
                or y.max() >= classifier.spec.num_classes:
            raise ValueError(f"labels must be ({shape[0]},) ints in [0, {classifier.spec.num_classes}), got shape "
                             f"{y.shape} dtype {y.dtype}")
        return sample(params, key, jnp.asarray(y, jnp.int32), classifier.params)

    return run


def guided_sample_fn_for_run(exp, graphdef, params, spec: SamplerSpec, shape: tuple[int, ...], folder: str,
                             scale: float | None, mesh=None):
    """(sample(params, key, labels), labels 0, 1, ..., K-1, 0, ...) for a run's `Experiment` and the classifier
    in FOLDER with weight `scale` (None -> 1): what `diffusion-jax sample --classifier` runs."""
    from diffusion_jax.config import build_schedule
    from diffusion_jax.train.classifier import load_noisy_classifier

    clf = load_noisy_classifier(folder)
    m = exp.model
    sample = make_classifier_guided_sample_fn(graphdef, build_schedule(exp.schedule, params), spec, shape, clf,
                                              1.0 if scale is None else scale, prediction=exp.loss.prediction,
                                              learn_sigma=m.learn_sigma, num_classes=m.num_classes, mesh=mesh)
    return sample, np.arange(shape[0], dtype=np.int32) % clf.spec.num_classes
