"""Classifier guidance (Dhariwal & Nichol 2021) with a noise-conditional classifier trained by the project.

    classifier.py  p_phi(y | x_t, t): a small FiLM conv net read through the level's log-SNR
    training.py    its pure jitted train step on x_t = alpha_t x0 + sigma_t eps, orbax checkpoints, loading
    wrapper.py     classifier_guided(denoise_fn, ...): eps' = eps - w sigma grad_x log p_phi(y | x_t), any sampler
    sampling.py    a trained diffusion model + classifier -> a jitted guided sampler

Classifier-free guidance (Ho & Salimans 2022) lives with the samplers (`samplers.wrapper.Guidance`; trained with
loss.cond_drop_prob).
"""
from diffusion_jax.guidance.classifier import ClassifierSpec, NoisyClassifier, make_log_prob_fn, noise_condition
from diffusion_jax.guidance.sampling import (check_classifier_fits, guided_sample_fn_for_run,
                                             make_classifier_guided_sample_fn)
from diffusion_jax.guidance.training import (ClassifierRecipe, TrainedClassifier, load_noisy_classifier,
                                             make_train_step, train_noisy_classifier)
from diffusion_jax.guidance.wrapper import class_log_prob_grad, classifier_guided, guidance_delta

__all__ = ["ClassifierRecipe", "ClassifierSpec", "NoisyClassifier", "TrainedClassifier", "check_classifier_fits",
           "class_log_prob_grad", "classifier_guided", "guidance_delta", "guided_sample_fn_for_run", "load_noisy_classifier",
           "make_classifier_guided_sample_fn", "make_log_prob_fn", "make_train_step", "noise_condition",
           "train_noisy_classifier"]
