"""Training unCLIP's stages (paper section 2): losses, sharded train steps, checkpoints and the trainer.

    python -m unclip_jax.train --config configs/tiny.py:decoder --workdir /tmp/unclip_decoder

Map:
    config_lib.py   the keys every config shares (`common(stage)`), read the same by every stage
    data.py         the data-source protocol, synthetic batches, `make_source(config, stage)`
    losses.py       the three objectives and the upsamplers' conditioning degradations
    state.py        TrainState, the optimiser (AdamW + warm-up/decay + clipping), EMA
    sharding.py     mesh from the config, logical-axis rules -> shardings, per-host batches
    stages.py       per stage: which modules train, initialisation (scratch or pretrained), export, samples
    steps.py        the jitted train step (accumulation, non-finite guard) and the sample functions
    checkpoint.py   Orbax CheckpointManager: save / resume / restore onto another mesh, SIGTERM
    metrics.py      TensorBoard + JSON-lines writer, progress line, FLOPs and MFU
    trainer.py      the loop that ties them together
"""

STAGES = ("clip", "prior", "decoder", "upsampler", "upsampler_1024")
