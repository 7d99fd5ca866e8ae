r"""The decoder (paper section 2.1) at Karlo v1 alpha's size: a 64x64 UNet2DConditionModel with added-KV
attention (885M parameters) plus text_proj (7.9M), trained together. eps prediction with learned-range
variance, hybrid loss L_simple + 0.001 L_vlb; the CLIP image embedding becomes the learned null embedding 10%
of the time and the text the empty prompt 30% of the time (Karlo; the paper drops text 50%); dropout 0.1.

From scratch:

    python -m unclip_jax.train --config configs/karlo_decoder.py --workdir $WORKDIR

Fine-tune Karlo's decoder and text_proj:

    python -m unclip_jax.train --config configs/karlo_decoder.py:finetune --workdir $WORKDIR

A laptop-size run of the same settings:

    python -m unclip_jax.train --config configs/karlo_decoder.py:runlocal --workdir /tmp/karlo_decoder_local

Memory: 893M float32 parameters + Adam + EMA are 14 GB before activations; shard them with
--config.mesh.fsdp=N and trade compute for activation memory with --config.remat=True.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
import karlo_common  # noqa: E402

from unclip_jax.models.text_proj import TextProjConfig  # noqa: E402
from unclip_jax.models.unet import KARLO_DECODER_CONFIG  # noqa: E402
from unclip_jax.training import config_lib  # noqa: E402


def get_config(arg: str = ""):
    variants = karlo_common.parse(arg)
    c = config_lib.common("decoder")
    c.model.decoder = dict(KARLO_DECODER_CONFIG, dropout=0.1)
    c.model.text_proj = TextProjConfig().to_dict()
    c.text_encoder = karlo_common.KARLO
    c.text_length, c.vocab_size, c.clip_dim, c.text_hidden_dim = 77, 49408, 768, 768
    c.image_size = 64
    c.text_drop = 0.3
    c.image_embed_drop = 0.1
    c.vb_weight = 0.001
    c.batch_size = 2048
    c.total_steps = 800_000
    c.learning_rate = 1.2e-4
    c.warmup_steps = 10_000
    c.compute_dtype = "bfloat16"
    c.log_every = 100
    c.checkpoint_every = 2000
    c.sample_every = 5000
    c.sample_steps = 25
    c.sample_guidance = 8.0   # Karlo's decoder guidance scale
    if "finetune" in variants:
        c.init_from = karlo_common.KARLO
        c.dropout = 0.1       # Karlo's config.json says 0.0: training adds it back
        c.learning_rate = 1e-5
        c.warmup_steps = 500
        c.total_steps = 20_000
        c.batch_size = 256
    if "runlocal" in variants:
        return karlo_common.runlocal(c, "decoder")
    return c
