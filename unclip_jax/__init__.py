"""unclip_jax: unCLIP (DALL-E 2, Karlo) in JAX/Flax.

    import unclip_jax
    module, params = unclip_jax.load_component("kakaobrain/karlo-v1-alpha", "prior")
"""

from unclip_jax.convert import CheckpointError, load_component, save_component
from unclip_jax.models import from_config
from unclip_jax.pipeline import (ImagePipelineOutput, UnCLIPImageVariationPipeline, UnCLIPPipeline,
                                 enable_compilation_cache)

__version__ = "0.1.0"
__all__ = ["CheckpointError", "load_component", "save_component", "from_config", "UnCLIPPipeline",
           "UnCLIPImageVariationPipeline", "ImagePipelineOutput", "enable_compilation_cache"]
