"""Loss weightings in one vocabulary: w(lambda), the weight on the noise error ||eps - eps_hat||^2 at log-SNR
lambda = log(alpha^2 / sigma^2), as in Kingma & Gao 2023 ("Understanding Diffusion Objectives as the ELBO with
Simple Data Augmentation", sec. 2-3). Every MSE objective of diffusion_jax (discrete DDPM, continuous DSM) is

    L = E_{t ~ q(t), x0, eps} [ w(lambda_t) ||eps - eps_hat(x_t, t)||^2 ] / (a density correction for q, if any),

and a network of kind k (eps | x0 | v | score) trains on its own target, whose squared error is c_k(SNR) times the x0
error while the eps error is SNR times it (`param.mse_to_x0_mse_factor`), so the weight on the target's MSE is
w(lambda) SNR / c_k(SNR) (`target_weight`). With SNR = e^lambda:

    simple      w = c_k / SNR              the MSE of the network's own target (Ho et al. 2020 L_simple for eps;
                                           c_v and c_score as in `param`, for VP processes)
    const       w = 1 / SNR                the x0-MSE
    snr         w = 1                      the eps-MSE (score_sde's lambda(t) = sigma^2; Hang et al.'s "SNR")
    max_snr     w = max(SNR, gamma) / SNR  truncated SNR (Salimans & Ho 2022 use gamma = 1)
    min_snr     w = min(SNR, gamma) / SNR  Min-SNR-gamma (Hang et al. 2023, gamma = 5)
    v           w = (SNR + 1) / SNR        the v-MSE (Salimans & Ho 2022) on VP processes
    likelihood  w = -d lambda / dt         continuous time only: score_sde's lambda(t) = g^2 (Song, Durkan, Murray &
                                           Ermon 2021), since g^2 / sigma^2 = -d lambda / dt; the ELBO, Kingma & Gao's
                                           w(lambda) = 1 once t is written as lambda

The objectives with their own fixed weighting say theirs in this vocabulary too: EDM (edm.py) weights the x0 error by
(s^2 + sigma_d^2) / (s sigma_d)^2 with s = e^(-lambda / 2), i.e. w = (s^2 + sigma_d^2) / sigma_d^2, at log-normal s;
VDM (vdm.py) is the continuous ELBO, w = 1 in lambda, i.e. "likelihood".
"""
from __future__ import annotations

import jax.numpy as jnp

from diffusion_jax.objectives import param

WEIGHTINGS = ("simple", "const", "snr", "max_snr", "min_snr", "v", "likelihood")
CONTINUOUS_ONLY = ("likelihood",)


def eps_weight(weighting: str, log_snr, *, prediction: str = "eps", gamma: float = 5.0, neg_dlogsnr_dt=None):
    """w(lambda) on ||eps - eps_hat||^2 (module doc) at log_snr (any shape). neg_dlogsnr_dt: -d lambda / dt at the same
    times, needed by "likelihood" only. prediction: the network's kind, used by "simple" only."""
    snr = jnp.exp(log_snr)
    if weighting == "simple":
        return param.mse_to_x0_mse_factor(prediction, snr) / snr
    if weighting == "const":
        return 1.0 / snr
    if weighting == "snr":
        return jnp.ones_like(snr)
    if weighting == "max_snr":
        return jnp.maximum(snr, gamma) / snr
    if weighting == "min_snr":
        return jnp.minimum(snr, gamma) / snr
    if weighting == "v":
        return (snr + 1.0) / snr
    if weighting == "likelihood":
        if neg_dlogsnr_dt is None:
            raise ValueError("loss.weighting='likelihood' weights by -d log_snr / dt: it needs a continuous-time "
                             "process (schedule.kind vp, subvp or ve)")
        return neg_dlogsnr_dt * jnp.ones_like(snr)
    raise ValueError(f"loss.weighting={weighting!r} is unknown; choose from {WEIGHTINGS}")


def target_weight(weighting: str, prediction: str, log_snr, *, gamma: float = 5.0, neg_dlogsnr_dt=None):
    """The weight on the MSE of the network's own target: w(lambda) SNR / c_k(SNR); exactly 1 for "simple"."""
    if weighting == "simple":
        return jnp.ones_like(log_snr)
    snr = jnp.exp(log_snr)
    w = eps_weight(weighting, log_snr, prediction=prediction, gamma=gamma, neg_dlogsnr_dt=neg_dlogsnr_dt)
    return w * snr / param.mse_to_x0_mse_factor(prediction, snr)


def check_weighting(weighting: str, continuous: bool) -> None:
    """A known weighting name, available for this kind of time."""
    if weighting not in WEIGHTINGS:
        raise ValueError(f"loss.weighting={weighting!r} is unknown; choose from {WEIGHTINGS}")
    if weighting in CONTINUOUS_ONLY and not continuous:
        raise ValueError(f"loss.weighting={weighting!r} needs a continuous-time process (schedule.kind vp, subvp or "
                         "ve); discrete schedules train the bound with loss.loss_type='vlb' or 'hybrid'")
