r"""The demo model shipped in unclip_jax/demo/model: a small unCLIP trained from nothing on captioned shapes
scenes (unclip_jax.demo.shapes), every stage with this project's trainer. One command makes it, resuming
whatever an earlier run left in the workdir:

    python -m unclip_jax.demo.recipe --workdir /tmp/unclip_demo            # about 10 minutes on an H100

On an idle 2-core CPU the recipe takes about 63 minutes (session 9's CPU) to an hour and three quarters (session
7's, a slower one): the measured times of its stages added up (BENCHMARKS.md), most of it the decoder's 5000 x 16
steps (34-60 minutes: 1.3-3 steps/s, 12.7 GFLOP per step); the CLIP takes 9-11 minutes, the prior 12-13 (6000 x 128
steps), the upsampler 6-10, the two datasets and their embeddings 2-3. The shipped weights: the CLIP from a run of
this recipe on an H100, the upsampler from these configs on the 2-core CPU, the prior from these configs on the
2-core CPU trained 2x longer (12000 x 128 steps, 27 minutes), and the decoder from these configs on the 2-core CPU
trained 8.8x longer (44000 x 16 steps: 5000, then resumed three times with a new cosine schedule, over 20000, 32000
and 44000; 4 h 25 min on sessions 9-12's CPU), the last two on the shipped CLIP's embeddings (its float32 weights;
the package's are rounded to float16):

    python -m unclip_jax.demo.recipe --workdir W --from-model demo --steps data,embed,decoder     # 5000 steps
    python -m unclip_jax.demo.recipe --workdir W --from-model demo --steps decoder --set total_steps=20000
    python -m unclip_jax.demo.recipe --workdir W --from-model demo --steps decoder --set total_steps=32000
    python -m unclip_jax.demo.recipe --workdir W --from-model demo --steps decoder --set total_steps=44000
    rm -r W/prior     # the shipped prior the first command copied in (and its seeded_from.json)
    python -m unclip_jax.demo.recipe --workdir W --from-model demo --steps prior,assemble,evaluate \
        --set total_steps=12000

Each decoder command resumes from the last checkpoint (a new cosine schedule over the new total_steps); the model
samples with decoder guidance 2 (DEMO_SETTINGS in unclip_jax.demo.recipe).

It builds the dataset (TFDS) and the prior's (the same scenes and as many more, captions leaving sizes and
positions out half the time: PRIOR_DATA in unclip_jax.demo.recipe), trains the BPE tokenizer, then runs these
configs in order, embeds both datasets with the new CLIP between the clip and prior stages, assembles the diffusers
folder and evaluates it (--install copies it into the package). Each stage can also be run by hand:

    python -m unclip_jax.train --config configs/demo.py:clip,root=/tmp/unclip_demo --workdir /tmp/unclip_demo/clip
    ...                         configs/demo.py:prior,root=...       --workdir /tmp/unclip_demo/prior
    ...                         configs/demo.py:decoder,root=...     --workdir /tmp/unclip_demo/decoder
    ...                         configs/demo.py:upsampler,root=...   --workdir /tmp/unclip_demo/upsampler

Architectures: Karlo's, small. CLIP: a 2-layer text transformer and a 3-layer ViT (32 px, 4 px patches), width
and embedding 64. Prior: a 4-layer PriorTransformer over 64-d CLIP embeddings. Decoder: a 32x32
UNet2DConditionModel (channels 16, 32, 64) with added-KV attention at 16 and 8 px, plus text_proj; it predicts
v (prediction_type "v_prediction", below), not the noise. Upsampler: an attention-free
UNet2DModel, 32 -> 64 (2x, blur degradation), trained on 32 px crops as Karlo's on 64 px crops of 256.
`smoke` (e.g. configs/demo.py:decoder,smoke) cuts every stage to a few steps and small batches, for tests and
the training notebook.
"""

from unclip_jax.training import config_lib

TEXT_LEN = 24          # tokens (the longest two-shape caption is 23)
EMBED = 64             # CLIP embedding = text hidden size = prior width (as 768 is for Karlo)
DECODER_SIZE = 32
IMAGE_SIZE = 64        # the upsampler's output, what users get
CLIP_IMAGE_SIZE = 32
VOCAB = 588            # the trained tokenizer's size (512 byte symbols + merges + 2 specials); checked on use

TEXT_ENCODER = dict(architectures=["CLIPTextModelWithProjection"], model_type="clip_text_model",
                    vocab_size=VOCAB, hidden_size=EMBED, intermediate_size=4 * EMBED, projection_dim=EMBED,
                    num_hidden_layers=2, num_attention_heads=4, max_position_embeddings=TEXT_LEN,
                    hidden_act="quick_gelu", bos_token_id=VOCAB - 2, eos_token_id=VOCAB - 1, pad_token_id=VOCAB - 1)
IMAGE_ENCODER = dict(architectures=["CLIPVisionModelWithProjection"], model_type="clip_vision_model",
                     hidden_size=EMBED, intermediate_size=4 * EMBED, projection_dim=EMBED, num_hidden_layers=3,
                     num_attention_heads=4, image_size=CLIP_IMAGE_SIZE, patch_size=4, num_channels=3,
                     hidden_act="quick_gelu")
PRIOR = dict(_class_name="PriorTransformer", num_attention_heads=4, attention_head_dim=16, num_layers=4,
             embedding_dim=EMBED, num_embeddings=TEXT_LEN, additional_embeddings=4, dropout=0.0)
DECODER_CHANNELS = [16, 32, 64]
TEXT_PROJ = dict(_class_name="UnCLIPTextProjModel", clip_extra_context_tokens=4, clip_embeddings_dim=EMBED,
                 time_embed_dim=4 * DECODER_CHANNELS[0], cross_attention_dim=64)
DECODER = dict(_class_name="UNet2DConditionModel", sample_size=DECODER_SIZE, in_channels=3, out_channels=6,
               block_out_channels=DECODER_CHANNELS, layers_per_block=1,
               down_block_types=["ResnetDownsampleBlock2D", "SimpleCrossAttnDownBlock2D", "SimpleCrossAttnDownBlock2D"],
               up_block_types=["SimpleCrossAttnUpBlock2D", "SimpleCrossAttnUpBlock2D", "ResnetUpsampleBlock2D"],
               mid_block_type="UNetMidBlock2DSimpleCrossAttn", attention_head_dim=32, cross_attention_dim=64,
               class_embed_type="identity", resnet_time_scale_shift="scale_shift", norm_num_groups=8, dropout=0.0)
# The upsampler was channels 32, 64 (26 GFLOP per step at batch 16: 34 minutes on 2 CPU cores); at 16, 32 it is 6.7
# GFLOP and 10 minutes, and its 32 -> 64 px outputs of real renders pass every pixel check all the same (PSNR 31.7
# dB against the 64 px renders, 34.2 for the wide one; see the README's demo section).
SUPER_RES = dict(_class_name="UNet2DModel", sample_size=IMAGE_SIZE, in_channels=6, out_channels=3,
                 block_out_channels=[16, 32], layers_per_block=1,
                 down_block_types=["ResnetDownsampleBlock2D"] * 2, up_block_types=["ResnetUpsampleBlock2D"] * 2,
                 mid_block_type="UNetMidBlock2D", add_attention=False, attention_head_dim=None, norm_num_groups=8,
                 resnet_time_scale_shift="scale_shift")

# Steps and batches. The decoder's fit about an hour on 2 CPU cores (its channels were halved from 32, 64, 64 for
# that: 2.3x the examples per second there).
SCHEDULE = {  # stage: (total_steps, batch_size, learning_rate, warmup)
    "clip": (1200, 128, 2e-3, 100),
    "prior": (6000, 128, 1e-3, 100),    # 2000 on the decoder's data: short captions' shape 0.62 (README)
    "decoder": (5000, 16, 1e-3, 100),
    "upsampler": (1500, 16, 1e-3, 100),
}


def paths(root: str) -> dict:
    """Where the recipe puts each thing under its workdir."""
    return {"data": f"{root}/data", "prior_data": f"{root}/data_prior", "tokenizer": f"{root}/tokenizer",
            "clip": f"{root}/clip/export", "embeddings": f"{root}/data/embeddings", "model": f"{root}/model"}


def parse(arg: str) -> tuple[str, str, bool]:
    stage, root, smoke = "", "/tmp/unclip_demo", False
    for word in (w for w in (arg or "").split(",") if w):
        if word.startswith("root="):
            root = word[len("root="):]
        elif word == "smoke":
            smoke = True
        elif word in SCHEDULE:
            stage = word
        else:
            raise ValueError(f"configs/demo.py: unknown word {word!r} in {arg!r}; expected a stage "
                             f"({', '.join(SCHEDULE)}), root=<workdir> and/or smoke")
    if not stage:
        raise ValueError(f"configs/demo.py needs a stage: configs/demo.py:<{'|'.join(SCHEDULE)}>[,root=DIR][,smoke]")
    return stage, root, smoke


def get_config(arg: str = ""):
    stage, root, smoke = parse(arg)
    p = paths(root)
    c = config_lib.common(stage)
    steps, batch, lr, warmup = SCHEDULE[stage]
    c.total_steps, c.batch_size, c.learning_rate, c.warmup_steps = steps, batch, lr, warmup
    c.lr_schedule = "cosine"
    c.min_lr_ratio = 0.1
    c.ema_decay = 0.999
    c.compute_dtype = "float32"   # CPU: bf16 is emulated there; on a GPU / TPU pass --config.compute_dtype=bfloat16
    c.async_checkpoints = False
    c.text_length, c.vocab_size, c.clip_dim, c.text_hidden_dim = TEXT_LEN, VOCAB, EMBED, EMBED
    c.image_size, c.clip_image_size = DECODER_SIZE, CLIP_IMAGE_SIZE
    c.log_every = 50
    c.checkpoint_every = 500
    c.sample_every = steps
    c.num_samples = 16
    c.sample_steps = 25
    c.data = p["data"]
    if stage == "clip":
        c.model.text_encoder = TEXT_ENCODER
        c.model.image_encoder = IMAGE_ENCODER
        c.tokenizer = p["tokenizer"]
        c.num_samples = 64
    elif stage == "prior":
        # its own dataset: more scenes, captions that leave sizes and positions out more often (PRIOR_DATA in
        # unclip_jax.demo.recipe)
        c.data = p["prior_data"]
        c.model.prior = PRIOR
        c.text_encoder = p["clip"]
        c.text_drop = 0.1
    elif stage == "decoder":
        c.model.decoder = DECODER
        c.model.text_proj = TEXT_PROJ
        c.text_encoder = p["clip"]
        c.text_drop = 0.5
        c.image_embed_drop = 0.1
        c.sample_guidance = 3.0
        # v prediction. Epsilon weighs the high noise levels by their tiny signal-to-noise ratio, and a small
        # decoder trained briefly never learnt there which colours the embedding asks for (background correct
        # 0.44 after 2000 steps). x0 ("sample") fixed the colours but rounds squares into circles even at low
        # noise (one-step x0 from t = 50: right shape 0.72); v keeps the image's own edges there (1.00) and learns
        # the shapes with more steps (README). diffusers' UnCLIPScheduler cannot sample v; unclip_jax can.
        c.prediction_type = "v_prediction"
    else:  # upsampler: 32 px crops of the 64 px images from 16 px, blurred (Karlo's 64 -> 256 recipe at 2x)
        c.model.super_res_first = SUPER_RES
        c.upsample_factor = 2
        c.crop_size = IMAGE_SIZE // 2
        c.degradation = "blur"
        c.target_size = IMAGE_SIZE
        c.sample_steps = 7
    if smoke:
        c.total_steps, c.warmup_steps = 4, 1
        c.batch_size = 8
        c.log_every = c.checkpoint_every = 2
        c.sample_every = 0   # no sample grids: their compile is most of a smoke run's time
        c.num_samples = 4
        c.sample_steps = 3
    return c
