r"""The diffusion prior (paper section 2.2) at Karlo v1 alpha's size: PriorTransformer, 20 layers x 2048 wide
(1.02B parameters), conditioned on CLIP ViT-L/14 text (77 tokens, width 768), predicting the normalised image
embedding x0 with an MSE loss; text dropped 20% of the time (Karlo; the paper uses 10%).

From scratch (clip_mean / clip_std estimated from the data first):

    python -m unclip_jax.train --config configs/karlo_prior.py --workdir $WORKDIR

Fine-tune Karlo's prior:

    python -m unclip_jax.train --config configs/karlo_prior.py:finetune --workdir $WORKDIR

A laptop-size run of the same settings (tiny model, synthetic data, a minute on a CPU):

    python -m unclip_jax.train --config configs/karlo_prior.py:runlocal --workdir /tmp/karlo_prior_local

The frozen CLIP text tower (and the tokenizer, for the empty prompt) come from config.text_encoder. Shard the
1B parameters and their Adam state with FSDP on many devices: --config.mesh.fsdp=8 (or -1 with
--config.mesh.data=1).
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
import karlo_common  # noqa: E402

from unclip_jax.models.prior import PriorConfig  # noqa: E402
from unclip_jax.training import config_lib  # noqa: E402


def get_config(arg: str = ""):
    variants = karlo_common.parse(arg)
    c = config_lib.common("prior")
    c.model.prior = PriorConfig().to_dict()
    c.text_encoder = karlo_common.KARLO
    c.text_length, c.vocab_size, c.clip_dim, c.text_hidden_dim = 77, 49408, 768, 768
    c.text_drop = 0.2
    c.batch_size = 4096
    c.total_steps = 600_000
    c.learning_rate = 1.1e-4
    c.warmup_steps = 10_000
    c.adam_b2 = 0.96
    c.adam_eps = 1e-6
    c.weight_decay = 6e-2
    c.compute_dtype = "bfloat16"
    c.log_every = 100
    c.checkpoint_every = 2000
    c.sample_every = 5000
    c.sample_steps = 25
    if "finetune" in variants:
        c.init_from = karlo_common.KARLO
        c.learning_rate = 1e-5
        c.warmup_steps = 500
        c.total_steps = 20_000
        c.batch_size = 512
    if "runlocal" in variants:
        return karlo_common.runlocal(c, "prior")
    return c
