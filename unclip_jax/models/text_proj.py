"""How the decoder sees its conditioning (paper section 2.1, Karlo's `UnCLIPTextProjModel`).

"We ... projecting and adding CLIP embeddings to the existing timestep embedding, and by projecting
CLIP embeddings into four extra tokens of context that are concatenated to the sequence of outputs
from the GLIDE text encoder."
"""

from __future__ import annotations

import dataclasses
from typing import Any

import flax.linen as nn
import jax.numpy as jnp

from unclip_jax.models import layers
from unclip_jax.models.layers import Dense, LayerNorm, check_shape

Dtype = Any


@dataclasses.dataclass(frozen=True)
class TextProjConfig:
    """Karlo: 4 extra tokens, CLIP dim 768, time embedding 1280, decoder context 1536."""
    time_embed_dim: int = 1280
    cross_attention_dim: int = 1536
    clip_extra_context_tokens: int = 4
    clip_embeddings_dim: int = 768

    @classmethod
    def from_dict(cls, d: dict) -> "TextProjConfig":
        fields = {f.name for f in dataclasses.fields(cls)}
        unknown = {k: v for k, v in d.items() if not k.startswith("_") and k not in fields}
        if unknown:
            raise ValueError(f"unclip_jax's UnCLIPTextProj does not support the config option(s) {unknown}")
        return cls(**{k: v for k, v in d.items() if k in fields})

    def to_dict(self) -> dict:
        return {"_class_name": "UnCLIPTextProjModel", **dataclasses.asdict(self)}


class UnCLIPTextProj(nn.Module):
    """Turns (image embedding, text embedding, text hidden states) into the decoder's conditioning.

    __call__(image_embeddings (B, D), prompt_embeds (B', D), text_encoder_hidden_states (B', L, D),
             do_classifier_free_guidance) -> (encoder_hidden_states (B', K + L, cross_attention_dim),
                                               additive_clip_time_embeddings (B', time_embed_dim))

    With guidance, B' = 2B: the image embeddings become [learned null embedding x B; image embeddings]
    to match the [uncond; cond] text batch. K = clip_extra_context_tokens.
    """
    config: TextProjConfig
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    CONFIG_CLASS = TextProjConfig
    REFERENCE_CLASSES = ("UnCLIPTextProjModel",)
    CHECKPOINT_RULES = ()
    IGNORED_CHECKPOINT_KEYS = ()

    def dummy_inputs(self, batch_size: int = 1) -> dict:
        d = self.config.clip_embeddings_dim
        return dict(image_embeddings=jnp.zeros((batch_size, d)), prompt_embeds=jnp.zeros((batch_size, d)),
                    text_encoder_hidden_states=jnp.zeros((batch_size, 3, d)), do_classifier_free_guidance=False)

    def null_embedding(self):
        """The learned embedding that stands for "no image" (classifier-free guidance), (D,)."""
        return self.variables["params"]["learned_classifier_free_guidance_embeddings"]

    @nn.compact
    def __call__(self, image_embeddings, prompt_embeds, text_encoder_hidden_states, do_classifier_free_guidance: bool):
        c = self.config
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        d = c.clip_embeddings_dim
        null = layers.param(self, "learned_classifier_free_guidance_embeddings", (d,), ("embed",),
                            param_dtype=self.param_dtype)
        check_shape("image_embeddings", image_embeddings, (None, d), "(batch, clip_embeddings_dim)")
        b = image_embeddings.shape[0]
        if do_classifier_free_guidance:
            image_embeddings = jnp.concatenate([jnp.broadcast_to(null.astype(image_embeddings.dtype), (b, d)),
                                                image_embeddings], axis=0)
            b = 2 * b
        what = "(2 * batch, ...) = [uncond; cond]" if do_classifier_free_guidance else "(batch, ...)"
        check_shape("prompt_embeds", prompt_embeds, (b, d), f"{what}, clip_embeddings_dim")
        check_shape("text_encoder_hidden_states", text_encoder_hidden_states, (b, None, d),
                    f"{what}, tokens, clip_embeddings_dim")

        additive = (Dense(c.time_embed_dim, name="clip_image_embeddings_project_to_time_embeddings", **kw)(image_embeddings)
                    + Dense(c.time_embed_dim, name="embedding_proj", **kw)(prompt_embeds))

        k = c.clip_extra_context_tokens
        extra = Dense(k * c.cross_attention_dim, name="clip_extra_context_tokens_proj", **kw)(image_embeddings)
        # The reference reshapes to (B, dim, K) and transposes: token j is elements j, j+K, j+2K, ...
        extra = extra.reshape(b, c.cross_attention_dim, k).transpose(0, 2, 1)

        text = Dense(c.cross_attention_dim, name="encoder_hidden_states_proj", **kw)(text_encoder_hidden_states)
        text = LayerNorm(name="text_encoder_hidden_states_norm", **kw)(text)
        return jnp.concatenate([extra.astype(text.dtype), text], axis=1), additive
