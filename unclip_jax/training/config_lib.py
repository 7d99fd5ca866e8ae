"""The keys every training config shares. A config file (configs/*.py) starts from `common(stage)` and
overrides what it needs, so `--config.batch_size=...` means the same thing for every stage and size.

Stages (paper section 2): "clip" (a CLIP trained contrastively, for a domain with no CLIP of its own; the
paper's CLIP is frozen), "prior" (text -> CLIP image embedding), "decoder" (CLIP image embedding -> 64x64),
"upsampler" (64 -> 256, Karlo's super_res_first) and "upsampler_1024" (256 -> 1024, no public weights).
"""

from __future__ import annotations

import ml_collections

from unclip_jax.training import STAGES

# The component each stage trains (its folder name when exported with save_component) and the modules it
# needs; `text_proj` is trained with the decoder, as in unCLIP.
COMPONENT = {"clip": "clip", "prior": "prior", "decoder": "decoder", "upsampler": "super_res_first",
             "upsampler_1024": "super_res_1024"}

# Logical parameter axes (unclip_jax.models.layers) -> mesh axes. FSDP shards the model width, tensor
# parallelism the expanded width; tables, norms and conv kernels' spatial axes stay whole.
DEFAULT_RULES = (("embed", "fsdp"), ("mlp", "tensor"), ("vocab", None), ("norm", None),
                 ("conv_height", None), ("conv_width", None))


def common(stage: str) -> ml_collections.ConfigDict:
    """Every key the trainer reads, with defaults; a stage config overrides the model and a few numbers."""
    if stage not in STAGES:
        raise ValueError(f"unknown stage {stage!r}; expected one of {', '.join(STAGES)}")
    c = ml_collections.ConfigDict()
    c.stage = stage
    c.component = COMPONENT[stage]      # for an upsampler: super_res_first, super_res_last or a new name
    c.seed = 0

    # Steps, batch, optimiser. batch_size is global and per optimiser step; with grad_accum_steps = k the
    # step runs k micro-batches of batch_size / k and averages their gradients.
    c.total_steps = 1000
    c.batch_size = 64
    c.grad_accum_steps = 1
    c.learning_rate = 1e-4
    c.lr_schedule = "cosine"            # cosine | linear | constant, after a linear warm-up
    c.warmup_steps = 1000
    c.min_lr_ratio = 0.0                # the decay ends at learning_rate * min_lr_ratio
    c.adam_b1 = 0.9
    c.adam_b2 = 0.999
    c.adam_eps = 1e-8
    c.weight_decay = 0.0                # AdamW, on kernels only (not norms, biases, embeddings)
    c.grad_clip = 1.0                   # global-norm clipping; 0 disables
    c.ema_decay = 0.9999                # EMA of the parameters (what gets exported); 0 disables
    c.compute_dtype = "bfloat16"        # matmuls / convs; master weights and optimiser state are float32
    c.remat = False                     # rematerialise blocks in the backward pass (memory for compute)
    c.on_nonfinite = "skip"             # skip | stop: what a NaN / inf loss or gradient does
    c.max_nonfinite = 10                # consecutive skipped steps after which training stops anyway

    # Diffusion and conditioning dropout (classifier-free guidance).
    c.num_train_timesteps = 1000
    c.text_drop = 0.1                   # prior: 10% (paper), decoder: 50% (paper)
    c.logit_scale_init = 2.6592         # clip: log(1 / 0.07), CLIP's initial temperature (capped at 100)
    c.image_embed_drop = 0.1            # decoder: CLIP image embedding -> learned null embedding
    c.vb_weight = 0.001                 # decoder: hybrid loss L_simple + vb_weight * L_vlb (Improved DDPM)
    c.prediction_type = "epsilon"       # decoder: epsilon (Karlo's) | sample (x0: the MSE weighs every noise level
                                        # alike, so small models learn the colours and layout the embedding gives)
                                        # | v_prediction (v: x0 at high noise, x_t's own edges kept at low noise)
    c.loss_weighting = "none"           # decoder: none (the plain MSE of prediction_type) | clipped_snr (the x0
    c.snr_gamma = 5.0                   # error weighted by clip(SNR_t, 1, snr_gamma): no high noise level below
                                        # x0's weight, the low ones up to snr_gamma times it, where shapes' edges are)
    c.dropout = ml_collections.FieldReference(None, field_type=float)  # override the model's dropout
    c.clip_stats = "auto"               # prior: auto | data | keep: where clip_mean / clip_std come from
    c.clip_stats_batches = 8            # batches averaged when estimating them from data

    # Upsamplers: crops of a quarter of the target size, conditioning degraded on device when the batch
    # has no `low_res`.
    c.upsample_factor = 4
    c.degradation = "blur"              # blur (64 -> 256) | bsr (256 -> 1024) | none (unclip_jax.data.degrade)

    # Models: diffusers config dicts by component name. With init_from set, the architecture and the
    # weights come from that diffusers folder / hub id instead (load_component), e.g. to fine-tune Karlo.
    c.model = ml_collections.ConfigDict()
    c.init_from = ml_collections.FieldReference(None, field_type=str)
    # The frozen CLIP text tower, needed when batches carry no text_hidden_states and to encode the empty
    # prompt for text dropout: a diffusers folder / hub id holding text_encoder/ (and tokenizer/), or
    # None to build it from c.model.text_encoder with random weights (synthetic tests only).
    c.text_encoder = ml_collections.FieldReference(None, field_type=str)
    # The CLIP tokenizer folder the clip stage tokenizes captions with (and exports with the towers).
    c.tokenizer = ml_collections.FieldReference(None, field_type=str)
    c.frozen_in_state = False           # keep the text tower in the train state instead of an argument

    # Data: what the source yields (unclip_jax.training.data). Shapes must match the models.
    c.data = "synthetic"
    c.data_overfit = False              # synthetic: repeat one fixed batch (overfitting checks)
    c.data_text_hidden_states = True    # synthetic: include text_hidden_states (else encoded on device)
    c.text_length = 77
    c.vocab_size = 49408
    c.clip_dim = 768
    c.text_hidden_dim = 768
    c.image_size = 64                   # decoder sample size
    c.crop_size = 64                    # upsampler training crops (a quarter of the target size)
    c.target_size = ml_collections.FieldReference(None, field_type=int)  # upsamplers: images are resized to
                                        # this before cropping (None: 4 x crop_size, Karlo's 256 for 64 crops)
    c.clip_image_size = 224             # clip: the image tower's input size (the exported processor's crop)

    # Devices. Mesh axes in this order; -1 takes the devices left over. Batch rows are split over
    # data x fsdp; parameters by the logical rules (a dimension the mesh axis does not divide stays whole).
    c.mesh = ml_collections.ConfigDict(dict(data=-1, fsdp=1, tensor=1))
    c.sharding_rules = DEFAULT_RULES

    # Logging, samples, checkpoints, export.
    c.log_every = 50
    c.sample_every = 5000               # decoder and upsamplers: PNG grids (0 = never)
    c.num_samples = 8
    c.sample_steps = 25
    c.sample_guidance = 1.0             # decoder grids: classifier-free guidance scale (1 = off)
    c.checkpoint_every = 1000
    c.keep_checkpoints = 3
    c.async_checkpoints = True
    c.export_every = 0                  # also export EMA weights every N steps (0: at the end only)
    return c


def check(c: ml_collections.ConfigDict) -> None:
    """Fails early, naming the key, on values that would otherwise fail deep inside jit. Also reads
    `--config.init_from=None` (a string on the command line) as no value."""
    for key in ("init_from", "text_encoder", "tokenizer"):
        if c[key] in ("", "None", "none"):
            c[key] = None
    def need(ok, msg):
        if not ok:
            raise ValueError(f"config: {msg}")
    need(c.stage in STAGES, f"stage={c.stage!r}; expected one of {STAGES}")
    need(c.batch_size % c.grad_accum_steps == 0,
         f"batch_size={c.batch_size} is not a multiple of grad_accum_steps={c.grad_accum_steps}")
    need(c.lr_schedule in ("cosine", "linear", "constant"), f"lr_schedule={c.lr_schedule!r}; expected cosine, "
         "linear or constant")
    need(c.on_nonfinite in ("skip", "stop"), f"on_nonfinite={c.on_nonfinite!r}; expected skip or stop")
    need(c.compute_dtype in ("bfloat16", "float32", "float16"), f"compute_dtype={c.compute_dtype!r}")
    need(c.degradation in ("blur", "bsr", "none"), f"degradation={c.degradation!r}; expected blur, bsr or none")
    need(c.prediction_type in ("epsilon", "sample", "v_prediction"), f"prediction_type={c.prediction_type!r}; "
         "expected epsilon (the model predicts the noise), sample (it predicts x0) or v_prediction (it predicts "
         "v = sqrt(abar) eps - sqrt(1 - abar) x0)")
    need(c.prediction_type == "epsilon" or c.stage == "decoder", f"prediction_type={c.prediction_type!r} is a "
         f"decoder setting; the {c.stage} stage's objective is fixed (prior: x0, upsamplers: the noise)")
    need(c.loss_weighting in ("none", "clipped_snr"), f"loss_weighting={c.loss_weighting!r}; expected none or "
         "clipped_snr")
    need(c.loss_weighting == "none" or c.stage == "decoder", f"loss_weighting={c.loss_weighting!r} is a decoder "
         f"setting; the {c.stage} stage's loss is the plain MSE")
    need(c.snr_gamma >= 1, f"snr_gamma={c.snr_gamma}; expected >= 1 (the weights are clip(SNR, 1, snr_gamma))")
    need(c.clip_stats in ("auto", "data", "keep"), f"clip_stats={c.clip_stats!r}; expected auto, data or keep")
    need(set(c.mesh.keys()) <= {"data", "fsdp", "tensor"}, f"mesh has axes {sorted(c.mesh.keys())}; expected "
         "data, fsdp and tensor")
    for key in ("text_drop", "image_embed_drop"):
        need(0.0 <= c[key] <= 1.0, f"{key}={c[key]} is not a probability")
    if c.stage == "clip" and c.data != "synthetic":
        need(c.tokenizer is not None, "the clip stage tokenizes captions: set config.tokenizer (a CLIP tokenizer folder)")
    if c.stage.startswith("upsampler"):
        need(c.crop_size % c.upsample_factor == 0,
             f"crop_size={c.crop_size} is not a multiple of upsample_factor={c.upsample_factor}")
