"""Classifier guidance (Dhariwal & Nichol 2021) with a noise-conditional classifier.

    classifier.py  p_phi(y | x_t, t): a small FiLM conv net read through the level's log-SNR
    wrapper.py     classifier_guided(denoise_fn, ...): eps' = eps - w sigma grad_x log p_phi(y | x_t), any sampler

Training the classifier (its pure jitted train step on x_t = alpha_t x0 + sigma_t eps, orbax checkpoints, loading)
is `train.classifier`; a trained diffusion run + classifier -> a jitted guided sampler is `train.guided`.
Classifier-free guidance (Ho & Salimans 2022) lives with the samplers (`samplers.wrapper.Guidance`; trained with
loss.cond_drop_prob).
"""
from diffusion_jax.inference.guidance.classifier import (
    ClassifierSpec,
    NoisyClassifier,
    make_log_prob_fn,
    noise_condition,
)
from diffusion_jax.inference.guidance.wrapper import class_log_prob_grad, classifier_guided, guidance_delta

__all__ = ["ClassifierSpec", "NoisyClassifier", "class_log_prob_grad", "classifier_guided", "guidance_delta",
           "make_log_prob_fn", "noise_condition"]
