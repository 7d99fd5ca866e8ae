"""The demo: a small unCLIP trained by this project on captioned shapes scenes, shipped inside the package.

    pipe = unclip_jax.UnCLIPPipeline.from_pretrained("demo")     # or model_dir(), any loader takes "demo"
    images = pipe("a red circle on a blue background").images

| module | what |
|---|---|
| `shapes.py` | the scenes: attributes, captions, rendering, held-out pairs, the TFDS builder |
| `tokenizer.py` | a byte-level BPE trained with `tokenizers`, saved as a CLIP tokenizer |
| `recipe.py` | every step from nothing to the shipped folder (configs/demo.py holds the training configs) |
| `evaluate.py` | `unclip-jax evaluate`: pixel checks, CLIP R-precision, Frechet distance in the demo CLIP's space |

The model folder (diffusers layout, readable by diffusers too) is `unclip_jax/demo/model/`. Its decoder predicts v
(decoder_scheduler: v_prediction), which unclip_jax samples and diffusers' UnCLIPScheduler refuses at `step`.
"""

from __future__ import annotations

from pathlib import Path

MODEL_DIR = Path(__file__).resolve().parent / "model"


def model_dir() -> Path:
    """The shipped demo model's folder; a clear error when the package was installed without it."""
    from unclip_jax.convert.io import CheckpointError
    if not (MODEL_DIR / "model_index.json").exists():
        raise CheckpointError(f"the demo model is missing from {MODEL_DIR} (no model_index.json): reinstall "
                              "unclip_jax, or rebuild it with `python -m unclip_jax.demo.recipe` (configs/demo.py)")
    return MODEL_DIR
