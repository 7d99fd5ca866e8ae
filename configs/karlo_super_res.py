r"""The upsamplers (paper section 2.1). Stage `upsampler`: 64 -> 256 at Karlo v1 alpha's size (UNet2DModel,
no attention, 692M parameters; Karlo's super_res_first, or super_res_last with --config.component), trained
on random 64x64 crops of 256x256 images (a quarter of the target size) whose 16x16 downsampled conditioning
is gaussian-blurred. Stage `upsampler_1024`: 256 -> 1024 (no public weights; ~340M parameters here, the
paper's is 300M), trained on 256x256 crops of 1024x1024 images with BSR-style degradation. Both: eps MSE.

    python -m unclip_jax.train --config configs/karlo_super_res.py:upsampler --workdir $WORKDIR
    python -m unclip_jax.train --config configs/karlo_super_res.py:upsampler,finetune --workdir $WORKDIR
    python -m unclip_jax.train --config configs/karlo_super_res.py:upsampler_1024 --workdir $WORKDIR
    python -m unclip_jax.train --config configs/karlo_super_res.py:upsampler,runlocal --workdir /tmp/sr_local

At inference the upsamplers run at full size (256 or 1024): the architecture has no attention, so it
applies to any multiple of 8 pixels.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
import karlo_common  # noqa: E402

from unclip_jax.models.unet import KARLO_SUPER_RES_CONFIG  # noqa: E402
from unclip_jax.training import config_lib  # noqa: E402

SUPER_RES_1024 = dict(KARLO_SUPER_RES_CONFIG, sample_size=1024, block_out_channels=[224, 448, 672, 896])


def get_config(arg: str = "upsampler"):
    stage, _, rest = arg.partition(",")
    variants = karlo_common.parse(rest)
    c = config_lib.common(stage)
    if stage == "upsampler":
        c.model.super_res_first = dict(KARLO_SUPER_RES_CONFIG)
        c.model.super_res_last = dict(KARLO_SUPER_RES_CONFIG)
        c.crop_size = 64             # 256 / 4
        c.degradation = "blur"
        c.batch_size = 1024
        c.learning_rate = 1.2e-4
    elif stage == "upsampler_1024":
        c.model.super_res_1024 = SUPER_RES_1024
        c.crop_size = 256            # 1024 / 4
        c.degradation = "bsr"
        c.batch_size = 512
        c.learning_rate = 1e-4
    else:
        raise ValueError(f"karlo_super_res.py has stages upsampler and upsampler_1024, not {stage!r}")
    c.upsample_factor = 4
    c.total_steps = 1_000_000
    c.warmup_steps = 10_000
    c.compute_dtype = "bfloat16"
    c.log_every = 100
    c.checkpoint_every = 2000
    c.sample_every = 5000
    c.sample_steps = 7               # Karlo's super-res step count
    if "finetune" in variants:
        if stage != "upsampler":
            raise ValueError("there are no public 256 -> 1024 weights to fine-tune; train upsampler_1024 from scratch")
        c.init_from = karlo_common.KARLO
        c.learning_rate = 1e-5
        c.warmup_steps = 500
        c.total_steps = 20_000
        c.batch_size = 128
    if "runlocal" in variants:
        return karlo_common.runlocal(c, stage)
    return c
