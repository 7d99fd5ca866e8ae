r"""From nothing to the shipped demo model, every step resumable: run it again and it continues.

    python -m unclip_jax.demo.recipe --workdir /tmp/unclip_demo [--install] [--smoke]

Steps (each skipped when its output is complete; the training steps resume from their last checkpoint):

    data        the captioned shapes dataset (TFDS, ArrayRecord)             workdir/data
                and the prior's: more scenes, captions saying less           workdir/data_prior
    tokenizer   byte-level BPE on the training captions -> CLIP tokenizer     workdir/tokenizer
    clip        CLIP towers trained contrastively (configs/demo.py:clip)    workdir/clip/export
    embed       the new CLIP over both datasets                              workdir/data*/embeddings
    prior       configs/demo.py:prior                                        workdir/prior/export
    decoder     configs/demo.py:decoder (with text_proj)                     workdir/decoder/export
    upsampler   configs/demo.py:upsampler (32 -> 64)                         workdir/upsampler/export
    assemble    one diffusers unCLIP folder (plus image_encoder/ and feature_extractor/ for variations, and
                unclip_jax.json: the sampling settings the CLI uses for it)
                                                                             workdir/model
    evaluate    `unclip-jax evaluate` on it                                  workdir/model/evaluation

--install copies workdir/model into the package (unclip_jax/demo/model), what `--model demo` loads. The training
configs live in configs/demo.py (a source checkout); --configs points elsewhere.

--from-model MODEL (an assembled folder, "demo" or a hub id) retrains only the stages named in --steps: the
others' exports are copied from MODEL into the workdir first. To retrain the shipped demo's decoder longer:

    python -m unclip_jax.demo.recipe --workdir W --from-model demo --steps data,embed,decoder,assemble,evaluate \
        --set total_steps=50000
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import logging
import shutil
import sys
import time
from pathlib import Path

from unclip_jax.demo.shapes import OMIT

log = logging.getLogger("unclip_jax.demo.recipe")

STEPS = ("data", "tokenizer", "clip", "embed", "prior", "decoder", "upsampler", "assemble", "evaluate")
DATA_SIZES = {"train": 30000, "test": 1000, "heldout": 1000}
SMOKE_DATA_SIZES = {"train": 64, "test": 16, "heldout": 16}
# The prior's dataset: the same scenes and more (its first 30000 are `data`'s), captions leaving each size and each
# position out half the time (data's: 0.15). With data's captions 2% of one-shape captions say neither, and the
# prior drew the right shape for such prompts ("a red circle on a blue background") 0.62 of the time.
PRIOR_DATA = {"train": 60000, "omit": 0.5}
SMOKE_PRIOR_DATA = {"train": 64, "omit": 0.5}
DEFAULT_CONFIGS = Path(__file__).resolve().parents[2] / "configs" / "demo.py"

# The pipeline folder's model_index.json (diffusers' UnCLIPPipeline; the extra image tower is ignored there).
MODEL_INDEX = {
    "_class_name": "UnCLIPPipeline", "_diffusers_version": "0.35.0",
    "decoder": ["diffusers", "UNet2DConditionModel"], "decoder_scheduler": ["diffusers", "UnCLIPScheduler"],
    "prior": ["diffusers", "PriorTransformer"], "prior_scheduler": ["diffusers", "UnCLIPScheduler"],
    "super_res_first": ["diffusers", "UNet2DModel"], "super_res_last": ["diffusers", "UNet2DModel"],
    "super_res_scheduler": ["diffusers", "UnCLIPScheduler"],
    "text_encoder": ["transformers", "CLIPTextModelWithProjection"], "text_proj": ["unclip", "UnCLIPTextProjModel"],
    "tokenizer": ["transformers", "CLIPTokenizer"],
}


# What the assembled folder's unclip_jax.json tells the CLI and the pipelines: super-resolution from the noised
# upsampled image at t <= 333 (a 1500-step 2x upsampler drifts in colour when it starts from pure noise at t = 999),
# and the sampling settings the evaluation used.
DEMO_SETTINGS = {"super_res_start_timestep": 333,
                 "sampling_defaults": {"prior_num_inference_steps": 25, "decoder_num_inference_steps": 16,
                                       "super_res_num_inference_steps": 4, "prior_guidance_scale": 4.0,
                                       "decoder_guidance_scale": 2.0}}


# Where each trained component of the assembled folder comes from in the workdir: <stage>/export/<component>.
# (Assemble also writes the schedulers, taking decoder/export/decoder_scheduler when the decoder stage made one,
# and super_res_last, a copy of super_res_first.)
EXPORTS = {"text_encoder": "clip", "image_encoder": "clip", "tokenizer": "clip", "feature_extractor": "clip",
           "prior": "prior", "decoder": "decoder", "text_proj": "decoder", "super_res_first": "upsampler"}
TRAINED_STAGES = ("clip", "prior", "decoder", "upsampler")


def _seeded_components(stage: str) -> list[str]:
    """What --from-model copies into <stage>/export: the stage's components (the decoder's with its scheduler,
    which says what the model predicts)."""
    return [c for c, s in EXPORTS.items() if s == stage] + (["decoder_scheduler"] if stage == "decoder" else [])


def seed_from_model(root: str | Path, model: str | Path, stages) -> list[str]:
    """Copies the exports of `stages` (trained stages: clip, prior, decoder, upsampler) from an assembled unCLIP
    folder, "demo" or a hub id into the workdir, where the later steps look for them; returns the stages seeded.
    A stage whose export is already in the workdir keeps it (what a run trained there is never overwritten).
    Each seeded stage gets a seeded_from.json saying where its weights came from."""
    from unclip_jax.convert.io import resolve_folder
    root = Path(root)
    unknown = set(stages) - set(TRAINED_STAGES)
    if unknown:
        raise ValueError(f"--from-model seeds trained stages only ({', '.join(TRAINED_STAGES)}), not "
                         f"{sorted(unknown)}")
    todo = [s for s in TRAINED_STAGES if s in stages and not _done(root / s / "export")]
    if not todo:
        return []
    src = resolve_folder(model, patterns=("*.json", "*.safetensors", "*.txt"))
    missing = sorted({c for s in todo for c in _seeded_components(s) if not (src / c).is_dir()})
    if missing:
        raise FileNotFoundError(f"--from-model {model}: {src} has no {', '.join(missing)} folder(s), which the "
                                f"stage(s) {', '.join(todo)} need; retrain those stages (name them in --steps)")
    for stage in todo:
        tmp = root / stage / "export.partial"   # copied whole or not at all: a half copy would pass _done
        shutil.rmtree(tmp, ignore_errors=True)
        for component in _seeded_components(stage):
            shutil.copytree(src / component, tmp / component)
        tmp.rename(root / stage / "export")
        if stage == "clip" and not _done(root / "tokenizer"):   # the tokenizer step then keeps the CLIP's own
            shutil.copytree(src / "tokenizer", root / "tokenizer")
        (root / stage / "seeded_from.json").write_text(json.dumps({"model": str(model), "folder": str(src)}) + "\n")
        log.info("%s: taken from %s (not trained here)", stage, src)
    return todo


def load_configs(path: str | Path = DEFAULT_CONFIGS):
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path} is missing: the recipe reads the demo's training configs from "
                                "configs/demo.py in a source checkout of unclip_jax; pass --configs PATH")
    spec = importlib.util.spec_from_file_location("demo_configs", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _done(path: Path) -> bool:
    return path.exists() and any(path.iterdir())


def _build(out: Path, seed: int, sizes: dict, omit: float = OMIT) -> Path:
    from unclip_jax.demo.shapes import build_shapes_dataset
    marker = out / "shapes.json"
    want = {"sizes": sizes, "seed": seed}
    if omit != OMIT:   # the default's marker stays as workdirs built before `omit` was an option wrote it
        want["omit"] = omit
    if marker.exists() and json.loads(marker.read_text()) == want:
        log.info("data: %s is built", out)
        return out
    build_shapes_dataset(out, seed=seed, overwrite=True, omit=omit, **sizes)
    marker.write_text(json.dumps(want) + "\n")
    return out


def step_data(root: Path, smoke: bool, seed: int = 0) -> Path:
    """The dataset (workdir/data) and the prior's (workdir/data_prior: a train split only)."""
    prior = SMOKE_PRIOR_DATA if smoke else PRIOR_DATA
    _build(root / "data_prior", seed, {"train": prior["train"], "test": 0, "heldout": 0}, prior["omit"])
    return _build(root / "data", seed, SMOKE_DATA_SIZES if smoke else DATA_SIZES)


def step_tokenizer(root: Path, cfg, smoke: bool) -> Path:
    from unclip_jax.demo import shapes
    from unclip_jax.demo.tokenizer import train_clip_tokenizer
    out = root / "tokenizer"
    if (out / "vocab.json").exists():
        log.info("tokenizer: %s exists", out)
    else:
        n = (SMOKE_DATA_SIZES if smoke else DATA_SIZES)["train"]
        train_clip_tokenizer(shapes.all_captions("train", n), out, vocab_size=cfg.VOCAB, max_length=cfg.TEXT_LEN)
    vocab = len(json.loads((out / "vocab.json").read_text()))
    if vocab != cfg.VOCAB:
        raise ValueError(f"the tokenizer in {out} has {vocab} tokens but configs/demo.py's VOCAB is {cfg.VOCAB}: "
                         "set VOCAB to the tokenizer's size (or delete the folder to retrain it)")
    return out


def _parse(text: str):
    """A --set value: int, float, true/false/none, else the string."""
    low = text.lower()
    if low in ("true", "false"):
        return low == "true"
    if low == "none":
        return None
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            pass
    return text


def step_train(root: Path, cfg, stage: str, smoke: bool, overrides: dict) -> Path:
    from unclip_jax.training.trainer import train
    arg = f"{stage},root={root}" + (",smoke" if smoke else "")
    config = cfg.get_config(arg)
    for key, value in overrides.items():
        if key not in config:
            raise KeyError(f"--set {key}=...: the {stage} config has no key {key!r}")
        config[key] = _parse(value)
    workdir = root / stage
    export = workdir / "export"
    t0 = time.perf_counter()
    log.info("%s: training (python -m unclip_jax.train --config configs/demo.py:%s --workdir %s)", stage, arg, workdir)
    metrics = train(config, workdir)
    if metrics.get("preempted"):  # SIGTERM: the trainer saved a checkpoint; later stages must not run on without it
        raise SystemExit(f"recipe: the {stage} stage was interrupted at step {metrics.get('step')} (checkpoint "
                         f"saved in {workdir}); run the same command again to resume")
    log.info("%s: done in %.1f min", stage, (time.perf_counter() - t0) / 60)
    return export


def step_embed(root: Path) -> Path:
    from unclip_jax.data.embed import embed_dataset, load_towers
    towers = load_towers(str(root / "clip" / "export"))
    for data in ("data_prior", "data"):
        out = root / data / "embeddings"
        # Without the text hidden states (30k x 24 x 64 fp16 = 92 MB): the train steps run the small frozen text
        # tower.
        result = embed_dataset(str(root / "clip" / "export"), root / data, out, batch_size=512, towers=towers)
        log.info("embed: %s (%d examples now, complete=%s)", out, result.done_now, result.complete)
    return out


def step_assemble(root: Path) -> Path:
    from unclip_jax.diffusion import scheduler as sch
    out = root / "model"
    tmp = root / "model.partial"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    sources = {name: root / stage / "export" / name for name, stage in EXPORTS.items()}
    # The last super-resolution step uses the same network (Karlo trained a separate one for it).
    sources["super_res_last"] = sources["super_res_first"]
    missing = [str(p) for p in sources.values() if not p.exists()]
    if missing:
        raise FileNotFoundError("assemble: missing " + ", ".join(missing) + " (run the earlier steps)")
    for name, src in sources.items():
        shutil.copytree(src, tmp / name)
    from unclip_jax.training.stages import write_scheduler
    for name, config in (("prior_scheduler", sch.PRIOR), ("decoder_scheduler", sch.DECODER),
                         ("super_res_scheduler", sch.SUPER_RES)):
        trained = root / "decoder/export" / name   # the decoder stage says what its model predicts
        if name == "decoder_scheduler" and (trained / "scheduler_config.json").exists():
            shutil.copytree(trained, tmp / name)
        else:
            write_scheduler(tmp / name, config)
    (tmp / "model_index.json").write_text(json.dumps(MODEL_INDEX, indent=2) + "\n")
    (tmp / "unclip_jax.json").write_text(json.dumps(DEMO_SETTINGS, indent=2) + "\n")
    shutil.rmtree(out, ignore_errors=True)
    tmp.rename(out)
    log.info("assemble: %s", out)
    return out


def step_evaluate(root: Path, smoke: bool) -> dict:
    from unclip_jax.demo.evaluate import evaluate
    kw = (dict(num_heldin=4, num_heldout=4, num_two_shape=2, num_short=2, prior_steps=3, decoder_steps=3,
               super_res_steps=2) if smoke else {})
    return evaluate(str(root / "model"), out=root / "model" / "evaluation", **kw)


def to_float16(folder: Path) -> None:
    """Stores every float32 weight as float16 (half the package size; the loaders cast back to float32)."""
    import numpy as np
    from safetensors.numpy import load_file, save_file
    for path in sorted(Path(folder).rglob("*.safetensors")):
        tensors = load_file(str(path))
        save_file({k: v.astype(np.float16) if v.dtype == np.float32 else v for k, v in tensors.items()}, str(path),
                  metadata={"format": "pt"})


def install(root: Path, dest: Path | None = None) -> Path:
    """Copies the assembled model into the package (or `dest`) in float16, with its evaluation report as
    evaluation.json. The report's "folder" (the machine path it evaluated) becomes "<workdir>/..." there."""
    from unclip_jax.demo import MODEL_DIR
    dest = Path(dest) if dest is not None else MODEL_DIR
    root = Path(root)
    src = root / "model"
    if not (src / "model_index.json").exists():
        raise FileNotFoundError(f"{src} has no assembled model: run the recipe first")
    shutil.rmtree(dest, ignore_errors=True)
    shutil.copytree(src, dest, ignore=shutil.ignore_patterns("evaluation"))
    to_float16(dest)
    if (src / "evaluation" / "report.json").exists():
        report = json.loads((src / "evaluation" / "report.json").read_text())
        folder = Path(str(report.get("folder", "")))
        for base in (root, root.resolve()):
            if folder.is_absolute() and folder.is_relative_to(base):
                report["folder"] = str(Path("<workdir>") / folder.relative_to(base))
                break
        (dest / "evaluation.json").write_text(json.dumps(report, indent=1) + "\n")
    log.info("installed %s -> %s", src, dest)
    return dest


def run(root: str | Path, *, steps=STEPS, smoke: bool = False, configs=DEFAULT_CONFIGS, overrides: dict | None = None,
        do_install: bool = False, from_model: str | None = None) -> Path:
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    cfg = load_configs(configs)
    unknown = set(steps) - set(STEPS)
    if unknown:
        raise ValueError(f"unknown step(s) {sorted(unknown)}; the steps are {', '.join(STEPS)}")
    if from_model is not None:
        keep = [s for s in TRAINED_STAGES if s not in steps]
        if not keep:
            log.warning("--from-model %s: every stage is in --steps, so nothing is taken from it", from_model)
        seed_from_model(root, from_model, keep)
    t0 = time.perf_counter()
    timings = {}
    for step in STEPS:
        if step not in steps:
            continue
        ts = time.perf_counter()
        if step == "data":
            step_data(root, smoke)
        elif step == "tokenizer":
            step_tokenizer(root, cfg, smoke)
        elif step == "embed":
            step_embed(root)
        elif step == "assemble":
            step_assemble(root)
        elif step == "evaluate":
            step_evaluate(root, smoke)
        else:
            step_train(root, cfg, step, smoke, overrides or {})
        timings[step] = round(time.perf_counter() - ts, 1)
        log.info("step %s took %.1f s (%.1f min so far)", step, timings[step], (time.perf_counter() - t0) / 60)
    (root / "recipe_timings.json").write_text(json.dumps(timings, indent=2) + "\n")
    if do_install:
        install(root)
    return root / "model"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m unclip_jax.demo.recipe", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--workdir", default="/tmp/unclip_demo")
    p.add_argument("--steps", default=",".join(STEPS), help="comma-separated subset of: " + ", ".join(STEPS))
    p.add_argument("--smoke", action="store_true", help="a few examples and steps: checks the plumbing in minutes")
    p.add_argument("--install", action="store_true", help="copy the model into unclip_jax/demo/model")
    p.add_argument("--configs", default=str(DEFAULT_CONFIGS))
    p.add_argument("--from-model", default=None, metavar="MODEL",
                   help="take the trained stages not named in --steps from this assembled folder, 'demo' or hub id")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a training config key for every stage, e.g. --set compute_dtype=bfloat16")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", stream=sys.stdout)
    for noisy in ("absl", "orbax", "jax._src"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    overrides = dict(kv.split("=", 1) for kv in args.set)
    run(args.workdir, steps=[s for s in args.steps.split(",") if s], smoke=args.smoke, configs=args.configs,
        overrides=overrides, do_install=args.install, from_model=args.from_model)
    return 0


if __name__ == "__main__":
    sys.exit(main())
