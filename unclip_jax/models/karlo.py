"""The component configs of Kakao Brain's Karlo v1 alpha (diffusers layout), for building models at full
size without downloading anything: `from_config(name, KARLO[name])`. Parameter counts: text 123,650,304;
prior 1,022,030,080; text_proj 7,878,400; decoder 885,439,686; each super-res 691,579,523; vision 303,966,208.
"""

from unclip_jax.models.unet import KARLO_DECODER_CONFIG, KARLO_SUPER_RES_CONFIG

KARLO_TEXT_ENCODER = {
    "architectures": ["CLIPTextModelWithProjection"], "model_type": "clip_text_model", "hidden_size": 768,
    "intermediate_size": 3072, "num_hidden_layers": 12, "num_attention_heads": 12, "max_position_embeddings": 77,
    "vocab_size": 49408, "projection_dim": 768, "hidden_act": "quick_gelu", "layer_norm_eps": 1e-5,
    "bos_token_id": 0, "eos_token_id": 2, "pad_token_id": 1,
}
KARLO_IMAGE_ENCODER = {
    "architectures": ["CLIPVisionModelWithProjection"], "model_type": "clip_vision_model", "hidden_size": 1024,
    "intermediate_size": 4096, "num_hidden_layers": 24, "num_attention_heads": 16, "image_size": 224,
    "patch_size": 14, "num_channels": 3, "projection_dim": 768, "hidden_act": "quick_gelu", "layer_norm_eps": 1e-5,
}
KARLO_PRIOR = {"_class_name": "PriorTransformer", "attention_head_dim": 64, "embedding_dim": 768,
               "num_attention_heads": 32, "num_embeddings": 77, "num_layers": 20}
KARLO_TEXT_PROJ = {"_class_name": "UnCLIPTextProjModel", "clip_embeddings_dim": 768, "clip_extra_context_tokens": 4,
                   "cross_attention_dim": 1536, "time_embed_dim": 1280}

KARLO = {
    "text_encoder": KARLO_TEXT_ENCODER, "image_encoder": KARLO_IMAGE_ENCODER, "prior": KARLO_PRIOR,
    "text_proj": KARLO_TEXT_PROJ, "decoder": KARLO_DECODER_CONFIG, "super_res_first": KARLO_SUPER_RES_CONFIG,
    "super_res_last": KARLO_SUPER_RES_CONFIG,
}
