"""Straightness of a model's probability-flow ODE (Liu et al. 2023, "Flow straight and fast", eq. 7):

    S = int E || (Z_1 - Z_0) - dZ_tau / dtau ||^2 dtau        (here per dimension: the squared norm / d)

in the straight-path coordinates of `samplers/flow.py` (tau = sigma / (alpha + sigma), z = x / (alpha + sigma)), where
every process's ODE is a flow dz/dtau = v = eps_hat - x0_hat and a rectified flow's is its own. S = 0 when every
trajectory is a straight line traversed at constant speed: one Euler step is then exact, which is what reflow
(2-rectified flow, `train/reflow.py`) buys. Measured along the K-step Euler solution (`flow_euler`), whose
velocities are v_k = (z_{k+1} - z_k) / (tau_{k+1} - tau_k), as the Riemann sum over the grid's span [tau_K, tau_0]:

    S_i = sum_k |tau_{k+1} - tau_k| mean_d (D_i - v_k)^2,     D_i = (z_0 - z_K) / (tau_0 - tau_K)

D_i the mean velocity of trajectory i (z_0 the noise end, z_K the sample): Liu et al.'s Z_1 - Z_0 on [0, 1]. Units:
squared data units (pixels in [-1, 1]) per dimension.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from diffusion_jax.samplers.flow import flow_euler
from diffusion_jax.samplers.registry import make_grid
from diffusion_jax.samplers.wrapper import make_denoiser


def straightness_of_trajectory(trajectory, grid) -> np.ndarray:
    """(N,) S_i (module doc) of a flow_euler trajectory (K + 1, N, ...) in x, on `grid` (K steps)."""
    x = np.asarray(trajectory, np.float64)
    alpha, sigma = np.asarray(grid.alpha, np.float64), np.asarray(grid.sigma, np.float64)
    if x.ndim < 2 or x.shape[0] != len(alpha):
        raise ValueError(f"trajectory must be (K + 1 = {len(alpha)}, N, ...) on the grid's levels, got {x.shape}")
    scale = (alpha + sigma).reshape((-1,) + (1,) * (x.ndim - 1))
    tau = sigma / (alpha + sigma)
    z = (x / scale).reshape(len(tau), x.shape[1], -1)
    h = np.diff(tau)                                       # < 0: tau falls from the noise to the data
    v = np.diff(z, axis=0) / h[:, None, None]
    mean_v = (z[0] - z[-1]) / (tau[0] - tau[-1])
    return np.abs(h) @ np.mean((mean_v[None] - v) ** 2, axis=2)


def model_straightness(exp, graphdef, params, noise, labels=None, *, steps: int = 100, spacing: str | None = None,
                       batch_size: int = 250) -> np.ndarray:
    """(N,) S_i of a trained run's ODE (`load_trained`'s exp, graphdef, EMA params) from standard-normal `noise`
    (N, H, W, C), scaled to the grid's first level as `run_sampler` draws x_T; labels (N,) for a class-conditional
    model (no guidance). K = `steps` Euler steps on uniform times (spacing "uniform", "linspace" on DDPM timesteps)."""
    from diffusion_jax.config import build_schedule
    from diffusion_jax.inference.sampling import network_denoise_fn
    from diffusion_jax.models.functional import make_apply_fn

    noise = np.asarray(noise, np.float32)
    if (labels is None) != (exp.model.num_classes is None):
        raise ValueError("labels must be given exactly when the model is class-conditional (model.num_classes)")
    schedule = build_schedule(exp.schedule, params)
    spacing = spacing or ("linspace" if schedule.discrete else "uniform")
    grid = jax.device_get(make_grid(schedule, steps, spacing))
    apply = make_apply_fn(graphdef)

    @jax.jit
    def trajectory(params, x_T, y):
        fn = network_denoise_fn(apply, params, y, channels=x_T.shape[-1], schedule=schedule)
        _, info = flow_euler(make_denoiser(fn, exp.loss.prediction), grid, x_T, return_trajectory=True)
        return info["trajectory"]

    start = float(np.sqrt(grid.alpha[0] ** 2 + grid.sigma[0] ** 2))
    out = []
    for i in range(0, len(noise), batch_size):   # the last chunk is padded to batch_size (one compile) and cut
        pad = lambda a: np.resize(a[i:i + batch_size], (min(batch_size, len(noise)),) + a.shape[1:])
        y = None if labels is None else jnp.asarray(pad(np.asarray(labels, np.int32)))
        traj = trajectory(params, jnp.asarray(pad(noise) * start), y)
        out.append(straightness_of_trajectory(traj, grid)[:len(noise) - i])
    return np.concatenate(out)
