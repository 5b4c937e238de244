"""The forward process x_t = alpha(t) x_0 + sigma(t) eps, one file per family:

    discrete.py   DiscreteSchedule: DDPM betas (linear, scaled_linear, cosine, sigmoid, zero terminal SNR)
    sde.py        VPSDE, SubVPSDE, VESDE (Song et al. 2021), EDMSchedule (Karras et al. 2022)
    vdm.py        VDMSchedule: a fixed or learned gamma(t) = -log SNR (Kingma et al. 2021)
    flow.py       RectifiedFlow: flow matching's linear interpolant, SD3's timestep shift (Lipman et al. 2023)

Every process answers the same questions, so that samplers, objectives, editing and likelihood never ask for its
type (tests/unit/test_layers.py checks that no code outside this package does):

    kind                 "discrete" | "vp" | "subvp" | "ve" | "edm" | "vdm" | "flow" (config schedule.kind)
    discrete             True for integer DDPM timesteps (the DDPM / DDIM chains and the VLB need them)
    t_min, t_max         the time range (discrete: timestep indices 0 and T - 1)
    alpha(t), sigma(t), log_snr(t)      the marginal's scales at time t
    network_level(t)     (alpha, sigma) of the level the network means by its time input t (editing, guidance)
    truncate(strength)   the process restricted to its first `strength` of time (SDEdit's [0, t_0])

Continuous processes add t_of_log_snr, the SDE's drift f(t) and diffusion g2(t), and network_time(t) (`sde.SDE`).
"""

PROTOCOL = ("kind", "discrete", "t_min", "t_max", "alpha", "sigma", "log_snr", "network_level", "truncate")


def check_process(schedule, name: str = "schedule") -> None:
    """ValueError naming `name` unless `schedule` answers the process protocol above."""
    missing = [m for m in PROTOCOL if not hasattr(schedule, m)]
    if missing:
        raise ValueError(f"{name} must be a forward process (process.discrete.DiscreteSchedule, a schedule of "
                         f"process/sde.py or process.vdm.VDMSchedule), got {type(schedule).__name__} without "
                         f"{', '.join(missing)}")
