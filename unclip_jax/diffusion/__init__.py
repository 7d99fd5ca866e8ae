"""Diffusion schedule, sampling steps and training terms for unCLIP (see `scheduler`)."""

from unclip_jax.diffusion.scheduler import (
    DECODER,
    PRIOR,
    SUPER_RES,
    SchedulerConfig,
    SchedulerState,
    alpha_bar,
    create_state,
    ddim_invert_step,
    ddim_sigma,
    ddim_step,
    discretized_gaussian_log_likelihood,
    learned_range_log_variance,
    normal_kl,
    posterior_mean_variance,
    predict_x0,
    q_sample,
    step,
    step_pairs,
    timesteps,
    vb_loss,
    velocity,
    x0_from_velocity,
)

__all__ = [
    "DECODER", "PRIOR", "SUPER_RES", "SchedulerConfig", "SchedulerState", "alpha_bar", "create_state",
    "ddim_invert_step", "ddim_sigma", "ddim_step", "discretized_gaussian_log_likelihood",
    "learned_range_log_variance", "normal_kl", "posterior_mean_variance", "predict_x0", "q_sample",
    "step", "step_pairs", "timesteps", "vb_loss", "velocity", "x0_from_velocity",
]
