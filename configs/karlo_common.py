"""Shared by the karlo_*.py configs (not a config itself): Karlo v1 alpha's architectures and the runlocal
switch. Loaded by path, since config files are not a package."""

import importlib.util
from pathlib import Path

KARLO = "kakaobrain/karlo-v1-alpha"


def tiny(stage: str):
    """configs/tiny.py's config for `stage`: what `runlocal` trains instead of the Karlo-size model."""
    spec = importlib.util.spec_from_file_location("tiny_config", Path(__file__).with_name("tiny.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config(stage)


def parse(arg: str) -> set[str]:
    """'finetune,runlocal' -> {'finetune', 'runlocal'}; unknown words are an error that lists the known ones."""
    words = {w for w in (arg or "").split(",") if w}
    unknown = words - {"finetune", "runlocal"}
    if unknown:
        raise ValueError(f"unknown config variant(s) {sorted(unknown)}; expected finetune and/or runlocal")
    return words


def runlocal(c, stage: str):
    """Shrinks everything (model, batch, steps) so the config runs on a laptop in a minute; keeps the stage's
    objective settings (dropout rates, loss weights, degradation)."""
    small = tiny(stage)
    for key in ("text_drop", "image_embed_drop", "vb_weight", "degradation", "upsample_factor"):
        small[key] = c[key]
    small.total_steps = 20
    small.log_every = 5
    small.checkpoint_every = 10
    small.sample_every = 20
    return small
