"""The image manipulations of the unCLIP paper (Ramesh et al. 2022, section 3), which no public
unCLIP offers in full: DDIM inversion to the bipartite latent (z_i, x_T), variations (DDIM eta > 0),
interpolations between images or prompts, text diffs, the best-of-N prior (section 2.2), and
RePaint-style inpainting.

    slerp.py   slerp, normalize                     the geometry
    ddim.py    BipartiteLatent, ddim_invert, ddim_decode, decode, super_resolve
    edits.py   interpolate_images, interpolate_prompts, text_diff, best_of_n_prior, inpaint
    mixin.py   ManipulationsMixin: the methods both pipelines have (invert, reconstruct, vary_ddim,
               interpolate, text_diff, sample_best_of_n, inpaint, with_component)

The functions are pure and jittable, with the modules (`sampling.Stages`) as their first, static
argument, like `unclip_jax.sampling`; the mixin compiles each once per shape and static setting.
"""

from unclip_jax.manipulations.ddim import (DEFAULT_INVERSION_STEPS, DEFAULT_MAX_TIMESTEP, BipartiteLatent,
                                           ddim_decode, ddim_invert, ddim_invert_with, ddim_sample_with,
                                           ddim_timesteps, decode, decode_latent, decoder_model, load_latent,
                                           save_latent, super_resolve)
from unclip_jax.manipulations.edits import (best_of_n_prior, inpaint, interpolate_images, interpolate_prompts,
                                            interpolate_text, repaint, text_diff, text_diff_embeddings,
                                            text_to_image_best_of_n)
from unclip_jax.manipulations.mixin import ManipulationOutput, ManipulationsMixin, binary_mask, decoder_pixels
from unclip_jax.manipulations.slerp import normalize, slerp

__all__ = [
    "DEFAULT_INVERSION_STEPS", "DEFAULT_MAX_TIMESTEP", "BipartiteLatent", "ddim_decode", "ddim_invert",
    "ddim_invert_with", "ddim_sample_with", "ddim_timesteps", "decode", "decode_latent", "decoder_model",
    "load_latent", "save_latent", "super_resolve", "best_of_n_prior", "inpaint", "interpolate_images",
    "interpolate_prompts", "interpolate_text", "repaint", "text_diff", "text_diff_embeddings",
    "text_to_image_best_of_n", "ManipulationOutput", "ManipulationsMixin", "binary_mask", "decoder_pixels",
    "normalize", "slerp",
]
