r"""Tiny unCLIP stages that train on a CPU in seconds, on synthetic data: smoke tests, CI, benchmarks.

    python -m unclip_jax.train --config configs/tiny.py:prior --workdir /tmp/tiny_prior
    python -m unclip_jax.train --config configs/tiny.py:decoder --workdir /tmp/tiny_decoder
    python -m unclip_jax.train --config configs/tiny.py:upsampler --workdir /tmp/tiny_upsampler
    python -m unclip_jax.train --config configs/tiny.py:upsampler_1024 --workdir /tmp/tiny_upsampler_1024

Same architectures as Karlo's (PriorTransformer, UNet2DConditionModel with added-KV attention + text_proj,
attention-free UNet2DModel upsamplers), a few thousand parameters each. Text is 16 tokens of a 256-word
vocabulary, CLIP width 32; the decoder makes 16x16 images; the upsamplers train on 32x32 crops (x4).
"""

from unclip_jax.training import config_lib

CLIP = 32
TEXT = 16
VOCAB = 256

TEXT_ENCODER = dict(architectures=["CLIPTextModelWithProjection"], model_type="clip_text_model",
                    vocab_size=VOCAB, hidden_size=CLIP, intermediate_size=64, projection_dim=CLIP,
                    num_hidden_layers=1, num_attention_heads=2, max_position_embeddings=TEXT,
                    hidden_act="quick_gelu", bos_token_id=VOCAB - 2, eos_token_id=VOCAB - 1, pad_token_id=0)
PRIOR = dict(_class_name="PriorTransformer", num_attention_heads=2, attention_head_dim=16, num_layers=2,
             embedding_dim=CLIP, num_embeddings=TEXT, additional_embeddings=4)
TEXT_PROJ = dict(_class_name="UnCLIPTextProjModel", clip_extra_context_tokens=2, clip_embeddings_dim=CLIP,
                 time_embed_dim=64, cross_attention_dim=32)
DECODER = dict(_class_name="UNet2DConditionModel", sample_size=16, in_channels=3, out_channels=6,
               block_out_channels=[16, 32], layers_per_block=1,
               down_block_types=["ResnetDownsampleBlock2D", "SimpleCrossAttnDownBlock2D"],
               up_block_types=["SimpleCrossAttnUpBlock2D", "ResnetUpsampleBlock2D"],
               mid_block_type="UNetMidBlock2DSimpleCrossAttn", attention_head_dim=8, cross_attention_dim=32,
               class_embed_type="identity", resnet_time_scale_shift="scale_shift", norm_num_groups=8, dropout=0.1)
SUPER_RES = dict(_class_name="UNet2DModel", sample_size=32, in_channels=6, out_channels=3,
                 block_out_channels=[16, 32], layers_per_block=1,
                 down_block_types=["ResnetDownsampleBlock2D"] * 2, up_block_types=["ResnetUpsampleBlock2D"] * 2,
                 mid_block_type="UNetMidBlock2D", add_attention=False, attention_head_dim=None, norm_num_groups=8)


def get_config(arg: str = "decoder"):
    stage, _, variant = arg.partition(",")  # e.g. "decoder" or "decoder,runlocal" (the same: already tiny)
    c = config_lib.common(stage)
    c.total_steps = 100
    c.batch_size = 8
    c.learning_rate = 1e-3
    c.warmup_steps = 10
    c.ema_decay = 0.99
    c.compute_dtype = "float32"  # CPU: bf16 is emulated and slower
    c.text_length, c.vocab_size, c.clip_dim, c.text_hidden_dim = TEXT, VOCAB, CLIP, CLIP
    c.image_size = 16
    c.crop_size = 32
    c.log_every = 10
    c.checkpoint_every = 50
    c.sample_every = 100
    c.num_samples = 4
    c.sample_steps = 10

    c.model.text_encoder = TEXT_ENCODER
    if stage == "prior":
        c.model.prior = PRIOR
    elif stage == "decoder":
        c.model.decoder = DECODER
        c.model.text_proj = TEXT_PROJ
        c.text_drop = 0.5
    elif stage == "upsampler":
        c.model.super_res_first = SUPER_RES
    else:  # upsampler_1024: same tiny net, BSR-style degradation
        c.model.super_res_1024 = SUPER_RES
        c.degradation = "bsr"
    del variant
    return c
