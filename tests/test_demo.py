"""The demo's parts: the shapes dataset, the trained CLIP tokenizer, the `clip` training stage and its data,
the fast CLIP preprocessing, the model-name alias and the default `--model` of the CLI."""

from __future__ import annotations

import io
import json
import re

import numpy as np
import pytest

from unclip_jax.demo import shapes

CAPTION = re.compile(r"^(a (small |large )?(\w+) (circle|square|triangle)( (at the [a-z ]+|in the center))?)"
                     r"( and (a (small |large )?(\w+) (circle|square|triangle)( (at the [a-z ]+|in the center))?))?"
                     r" on a (?P<bg>\w+) background$")


# ----------------------------------------------------------------------------------------------- scenes


def test_scenes_are_deterministic_and_hold_out_pairs():
    a = [s.to_json() for s in shapes.split_scenes("train", 300, seed=5)]
    assert a == [s.to_json() for s in shapes.split_scenes("train", 300, seed=5)]
    assert a != [s.to_json() for s in shapes.split_scenes("train", 300, seed=6)]
    for split in ("train", "test"):
        assert not any(shapes.is_held_out(s) for s in shapes.split_scenes(split, 500))
    held = list(shapes.split_scenes("heldout", 200))
    assert all(len(s.shapes) == 1 and (s.shapes[0].color, s.shapes[0].kind) in shapes.HELD_OUT for s in held)
    assert {(s.shapes[0].color, s.shapes[0].kind) for s in held} == set(shapes.HELD_OUT)


def test_captions_follow_the_grammar_and_say_what_is_drawn():
    scenes = list(shapes.split_scenes("train", 400))
    assert any(len(s.shapes) == 2 for s in scenes) and any(not s.shapes[0].say_position for s in scenes)
    for s in scenes:
        text = shapes.caption(s)
        m = CAPTION.match(text)
        assert m, text
        assert m.group(3) == s.shapes[0].color and m.group(4) == s.shapes[0].kind
        assert m.group("bg") == s.background
        assert s.background not in {x.color for x in s.shapes}
        for x in s.shapes:
            phrase = shapes.shape_phrase(x)
            assert phrase in text
            assert (x.size in phrase.split()) == x.say_size        # a size or position only when said
            assert (shapes.position_phrase(x.position) in phrase) == x.say_position


def test_omit_changes_only_what_the_captions_say():
    """The prior's data says fewer sizes and positions (omit): the same scenes and images, shorter captions."""
    base = list(shapes.split_scenes("train", 300))
    for omit in (0.0, 0.5, 1.0):
        other = list(shapes.split_scenes("train", 300, omit=omit))
        strip = lambda sc: [(x.kind, x.color, x.size, x.position, x.center) for x in sc.shapes]
        assert [(s.background, strip(s)) for s in other] == [(s.background, strip(s)) for s in base]
        said = np.mean([x.say_size for s in other for x in s.shapes])
        assert abs(said - (1 - omit)) < 0.08
    assert all(x.say_size and x.say_position for s in shapes.split_scenes("test", 50, omit=0) for x in s.shapes)
    assert all(shapes.caption(s) == f"a {s.shapes[0].color} {s.shapes[0].kind} on a {s.background} background"
               for s in shapes.split_scenes("heldout", 20, omit=1))
    with pytest.raises(ValueError, match="probability"):
        next(shapes.split_scenes("train", 1, omit=1.5))


def test_render_draws_the_named_colours_where_the_scene_says():
    scene = shapes.Scene("blue", (shapes.Shape("square", "red", "large", "top left", (1 / 6, 1 / 6)),))
    img = shapes.render(scene, 64)
    assert img.shape == (64, 64, 3) and img.dtype == np.uint8
    assert tuple(img[10, 10]) == shapes.COLORS["red"]       # inside the square
    assert tuple(img[50, 50]) == shapes.COLORS["blue"]      # background
    tri = shapes.render(shapes.Scene("white", (shapes.Shape("triangle", "black", "large", "center", (0.5, 0.5)),)))
    dark = (tri.mean(-1) < 128)
    rows = dark.sum(1)[dark.any(1)]
    assert rows[0] < rows[-1] / 3, "an upright triangle is narrow at the top and wide at the bottom"


def test_shapes_dataset_builds_and_loads_with_the_data_pipeline(tmp_path, own_tempdir):
    from unclip_jax.data import load_dataset
    version = shapes.build_shapes_dataset(tmp_path / "ds", train=12, test=4, heldout=3, progress=False)
    assert not list(own_tempdir.iterdir())     # tfds' GCS lookup left an empty tmp*tfds folder per build
    assert version.parent.name == shapes.NAME
    builder = load_dataset(tmp_path / "ds")
    assert {k: v.num_examples for k, v in builder.info.splits.items()} == {"train": 12, "test": 4, "heldout": 3}
    ex = builder.as_data_source("train")[5]            # tfds orders examples by key hash: find it by its key
    index = int(ex["key"].decode().split("/")[1])
    scene = list(shapes.split_scenes("train", 12))[index]
    assert ex["caption"].decode() == shapes.caption(scene)
    assert np.array_equal(ex["image"], shapes.render(scene))
    assert shapes.Scene.from_json(ex["scene"]) == scene
    with pytest.raises(FileExistsError, match="not empty"):
        shapes.build_shapes_dataset(tmp_path / "ds", train=1, test=1, heldout=1, progress=False)
    short = load_dataset(shapes.build_shapes_dataset(tmp_path / "short", train=12, test=0, heldout=0, omit=1.0,
                                                     progress=False).parent.parent)
    assert list(short.info.splits) == ["train"] and "probability 1.0" in short.info.description
    ex = short.as_data_source("train")[5]
    scene = list(shapes.split_scenes("train", 12, omit=1.0))[int(ex["key"].decode().split("/")[1])]
    assert ex["caption"].decode() == shapes.caption(scene) and np.array_equal(ex["image"], shapes.render(scene))
    with pytest.raises(ValueError, match="probability"):
        shapes.build_shapes_dataset(tmp_path / "bad", train=1, omit=-0.1, progress=False)


# -------------------------------------------------------------------------------------------- tokenizer


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory):
    from unclip_jax.demo.tokenizer import train_clip_tokenizer
    folder = tmp_path_factory.mktemp("tok")
    train_clip_tokenizer(shapes.all_captions("train", 2000), folder, vocab_size=600, max_length=24)
    return folder


def test_trained_tokenizer_is_a_clip_tokenizer_with_one_token_per_word(tokenizer_dir):
    from transformers import CLIPTokenizer
    tok = CLIPTokenizer.from_pretrained(str(tokenizer_dir))
    vocab = json.loads((tokenizer_dir / "vocab.json").read_text())
    assert len(tok) == len(vocab) and tok.bos_token_id == len(vocab) - 2 and tok.eos_token_id == len(vocab) - 1
    for text in shapes.all_captions("train", 50) + ["a red triangle on a blue background"]:
        pieces = tok.convert_ids_to_tokens(tok(text).input_ids)
        assert pieces == ["<|startoftext|>"] + [w + "</w>" for w in text.split()] + ["<|endoftext|>"]
        assert tok.decode(tok(text).input_ids, skip_special_tokens=True).strip() == text
    # An unseen word still tokenizes, into byte pieces (never an unknown token).
    ids = tok("a purple hexagon").input_ids
    assert tok.unk_token_id not in ids[1:-1] and len(ids) > 5
    with pytest.raises(ValueError, match="before any merge"):
        from unclip_jax.demo.tokenizer import train_clip_tokenizer
        train_clip_tokenizer(["a b"], tokenizer_dir / "x", vocab_size=100)


# ------------------------------------------------------------------------------------ CLIP preprocessing


@pytest.mark.parametrize("size", [(64, 64), (64, 80), (81, 64), (37, 53), (100, 33), (32, 32)])
def test_fast_clip_pixels_equal_the_image_processor(size):
    from PIL import Image
    from transformers import CLIPImageProcessorPil

    from unclip_jax.data.embed import clip_pixels
    proc = CLIPImageProcessorPil(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    rng = np.random.default_rng(sum(size))
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (*size, 3), dtype=np.uint8)).save(buf, format="PNG")
    with Image.open(io.BytesIO(buf.getvalue())) as im:
        ref = proc(images=[im.convert("RGB")], return_tensors="np").pixel_values[0].transpose(1, 2, 0)
    np.testing.assert_allclose(clip_pixels(proc, buf.getvalue()), ref, atol=1e-5)


# ------------------------------------------------------------------------------------------- clip stage


def test_clip_loss_treats_repeated_captions_as_positives():
    import jax.numpy as jnp

    from unclip_jax.training import losses

    class Fixed:  # stands in for a tower: returns the embeddings it is given as params
        def __init__(self, attr):
            self.attr = attr

        def apply(self, variables, *args):
            return type("Out", (), {self.attr: variables["params"]})()

    rng = np.random.default_rng(0)
    img, txt = rng.standard_normal((4, 8)), rng.standard_normal((4, 8))
    ids = np.array([[1, 2, 3], [1, 2, 3], [4, 5, 6], [7, 8, 9]])
    params = {"text_encoder": jnp.asarray(txt), "image_encoder": jnp.asarray(img), "logit_scale": jnp.float32(np.log(10))}
    batch = {"input_ids": ids, "attention_mask": np.ones_like(ids, bool), "pixel_values": None}
    loss, parts = losses.clip_loss(Fixed("text_embeds"), Fixed("image_embeds"), params, batch)

    unit = lambda x: x / np.linalg.norm(x, axis=-1, keepdims=True)
    logits = 10 * unit(img) @ unit(txt).T
    targets = np.array([[.5, .5, 0, 0], [.5, .5, 0, 0], [0, 0, 1, 0], [0, 0, 0, 1]])

    def xent(lg):
        return float(np.mean(-(targets * (lg - np.log(np.exp(lg).sum(-1, keepdims=True)))).sum(-1)))
    assert float(loss) == pytest.approx((xent(logits) + xent(logits.T)) / 2, rel=1e-5)
    assert float(parts["logit_scale"]) == pytest.approx(10, rel=1e-5)


def _tiny_clip_config(root, tokenizer_dir):
    from unclip_jax.training import config_lib
    vocab = len(json.loads((tokenizer_dir / "vocab.json").read_text()))
    c = config_lib.common("clip")
    c.model.text_encoder = dict(architectures=["CLIPTextModelWithProjection"], vocab_size=vocab, hidden_size=16,
                                intermediate_size=32, projection_dim=16, num_hidden_layers=1, num_attention_heads=2,
                                max_position_embeddings=24, hidden_act="quick_gelu", bos_token_id=vocab - 2,
                                eos_token_id=vocab - 1, pad_token_id=vocab - 1)
    c.model.image_encoder = dict(architectures=["CLIPVisionModelWithProjection"], hidden_size=16, intermediate_size=32,
                                 projection_dim=16, num_hidden_layers=1, num_attention_heads=2, image_size=16,
                                 patch_size=8, hidden_act="quick_gelu")
    c.data, c.tokenizer = str(root / "ds"), str(tokenizer_dir)
    c.text_length, c.clip_image_size, c.vocab_size, c.clip_dim = 24, 16, vocab, 16
    c.batch_size, c.total_steps, c.warmup_steps, c.learning_rate = 8, 3, 1, 1e-3
    c.compute_dtype, c.async_checkpoints = "float32", False
    c.log_every = c.checkpoint_every = c.sample_every = 3
    c.num_samples = 8
    return c


def test_clip_stage_trains_on_the_shapes_data_and_exports_a_complete_clip(tmp_path, tokenizer_dir):
    from unclip_jax.data import make_source
    from unclip_jax.data.embed import load_towers, tokenize
    from unclip_jax.training.trainer import train
    shapes.build_shapes_dataset(tmp_path / "ds", train=16, test=0, heldout=0, progress=False)
    c = _tiny_clip_config(tmp_path, tokenizer_dir)

    source = make_source(c, "clip")
    batch = next(source)
    source.close()
    assert batch["pixel_values"].shape == (8, 16, 16, 3) and batch["input_ids"].shape == (8, 24)
    assert batch["pixel_values"].min() < -1.5 and batch["pixel_values"].max() > 1.5   # CLIP-normalised

    metrics = train(c, tmp_path / "run")
    assert metrics["step"] == 3 and np.isfinite(metrics["loss"])
    export = tmp_path / "run" / "export"
    assert {p.name for p in export.iterdir()} == {"text_encoder", "image_encoder", "tokenizer", "feature_extractor"}
    towers = load_towers(str(export))          # what `unclip-jax data embed` and the pipelines read
    ids, mask, _ = tokenize(towers.tokenizer, ["a red circle on a blue background"], 24)
    out = towers.text.apply({"params": towers.text_params}, ids, mask)
    assert out.text_embeds.shape == (1, 16)
    assert towers.processor.crop_size == {"height": 16, "width": 16}


def test_clip_stage_learns_on_synthetic_batches():
    import jax

    from unclip_jax.training import sharding, steps, trainer
    from unclip_jax.training.data import SyntheticData
    from unclip_jax.training.state import TrainState
    from unclip_jax.training import config_lib
    c = config_lib.common("clip")
    c.model.text_encoder = dict(architectures=["CLIPTextModelWithProjection"], vocab_size=64, hidden_size=16,
                                intermediate_size=32, projection_dim=16, num_hidden_layers=1, num_attention_heads=2,
                                max_position_embeddings=8, hidden_act="quick_gelu", bos_token_id=62, eos_token_id=63)
    c.model.image_encoder = dict(architectures=["CLIPVisionModelWithProjection"], hidden_size=16, intermediate_size=32,
                                 projection_dim=16, num_hidden_layers=1, num_attention_heads=2, image_size=16,
                                 patch_size=8, hidden_act="quick_gelu")
    c.text_length, c.vocab_size, c.clip_dim, c.clip_image_size = 8, 64, 16, 16
    c.batch_size, c.learning_rate, c.warmup_steps, c.lr_schedule = 16, 3e-3, 1, "constant"
    c.compute_dtype, c.data_overfit = "float32", True
    mesh = sharding.make_mesh(c.mesh, jax.devices()[:1])
    stage, tx, _, shardings = trainer.build(c, mesh)
    state = TrainState(**trainer.initial_state(c, stage, tx, shardings), frozen=None)
    assert float(state.params["logit_scale"]) == pytest.approx(np.log(1 / 0.07), rel=1e-4)
    batch = next(SyntheticData("clip", c))
    step = jax.jit(steps.make_train_step(stage, tx, c))
    losses = []
    for _ in range(40):
        state, m = step(state, batch, {})
        losses.append(float(m["loss"]))
    assert losses[-1] < 0.5 * losses[0], losses
    assert float(m["loss/accuracy"]) > 0.5


# ------------------------------------------------------------------------------------ model name, CLI


def test_demo_name_resolves_to_the_shipped_folder_or_says_it_is_missing(monkeypatch, tmp_path):
    import unclip_jax.demo as demo
    from unclip_jax.convert.io import CheckpointError, resolve_folder
    monkeypatch.setattr(demo, "MODEL_DIR", tmp_path / "nothing")
    with pytest.raises(CheckpointError, match="demo model is missing"):
        resolve_folder("demo")
    (tmp_path / "nothing").mkdir()
    (tmp_path / "nothing" / "model_index.json").write_text("{}")
    assert resolve_folder("demo") == tmp_path / "nothing"


def test_cli_commands_default_to_the_demo_model():
    import argparse

    from unclip_jax import manipulations_cli
    from unclip_jax.cli import _common
    p = argparse.ArgumentParser()
    _common(p)
    assert p.parse_args([]).model == "demo"
    sub = argparse.ArgumentParser().add_subparsers(dest="command")
    manipulations_cli.add_subcommands(sub)
    assert sub.choices["invert"].parse_args(["--image", "x.png"]).model == "demo"


# --------------------------------------------------------------- per-model settings, SDEdit super-resolution


@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory):
    import tiny_unclip
    root = tmp_path_factory.mktemp("tiny")
    tiny_unclip.build(root)
    return root / "unclip"


def test_model_settings_file_is_read_and_checked(tiny_folder, tmp_path):
    import shutil

    import unclip_jax
    from unclip_jax.convert.io import CheckpointError
    folder = tmp_path / "m"
    shutil.copytree(tiny_folder, folder)
    assert unclip_jax.UnCLIPPipeline.from_pretrained(folder).sampling_defaults == {}
    (folder / "unclip_jax.json").write_text(json.dumps({"super_res_start_timestep": 333, "sampling_defaults": {
        "decoder_guidance_scale": 3.0, "super_res_num_inference_steps": 5}}))
    pipe = unclip_jax.UnCLIPPipeline.from_pretrained(folder)
    assert pipe.stages.super_res_start_timestep == 333
    assert pipe.sampling_defaults == {"decoder_guidance_scale": 3.0, "super_res_num_inference_steps": 5}
    from unclip_jax.cli import KARLO_SETTINGS, sampling_settings
    args = type("Args", (), {"decoder_guidance": None, "decoder_steps": 9, "super_res_steps": None,
                             "prior_guidance": None, "prior_steps": None})()
    got = sampling_settings(args, pipe, KARLO_SETTINGS)
    assert got == dict(KARLO_SETTINGS, decoder_guidance_scale=3.0, super_res_num_inference_steps=5,
                       decoder_num_inference_steps=9)   # flag > model setting > Karlo's
    for bad, match in (({"super_res_start_timestep": -1}, "expected a timestep"),
                       ({"sampling_defaults": {"guidance": 2}}, "unknown setting")):
        (folder / "unclip_jax.json").write_text(json.dumps(bad))
        with pytest.raises(CheckpointError, match=match):
            unclip_jax.UnCLIPPipeline.from_pretrained(folder)


def test_manipulations_take_the_model_settings(tiny_folder, tmp_path, monkeypatch):
    """Steps and guidance left unset in the manipulation methods come from the model's unclip_jax.json (else
    Karlo's); what the caller passes wins. The jitted kernels are replaced by recorders: only the resolution
    of the settings is under test here (the kernels have their own tests)."""
    import shutil

    import jax
    import jax.numpy as jnp

    import unclip_jax
    from unclip_jax.manipulations import mixin
    folder = tmp_path / "m"
    shutil.copytree(tiny_folder, folder)
    model = {"decoder_guidance_scale": 3.0, "decoder_num_inference_steps": 6, "super_res_num_inference_steps": 2,
             "prior_guidance_scale": 2.5, "prior_num_inference_steps": 5}
    (folder / "unclip_jax.json").write_text(json.dumps({"sampling_defaults": model}))
    pipe = unclip_jax.UnCLIPPipeline.from_pretrained(folder)

    class Recorded(Exception):
        pass

    seen = {}

    def prompt_rows(stages, params, a, b, thetas, uncond, key, prior_scale, *, prior_num_steps, guidance):
        seen["prior"] = (float(prior_scale), prior_num_steps)
        return jnp.zeros((thetas.shape[0], 4)), None, None, jax.random.key(0)

    def decode(stages, params, z, text, uncond, x_t, keys, scale, eta, *, num_steps, super_res_num_steps, **kw):
        seen["decoder"] = (float(scale), num_steps, super_res_num_steps)
        raise Recorded

    def best_of_n(stages, params, cond, uncond, rng, prior_scale, decoder_scale, **kw):
        seen["best_of_n"] = (float(prior_scale), float(decoder_scale), kw["prior_num_inference_steps"],
                             kw["decoder_num_inference_steps"], kw["super_res_num_inference_steps"])
        raise Recorded

    monkeypatch.setattr(mixin, "_prompt_rows", prompt_rows)
    monkeypatch.setattr(mixin, "_decode", decode)
    monkeypatch.setattr(mixin, "_best_of_n", best_of_n)
    with pytest.raises(Recorded):
        pipe.interpolate("a red circle", "a blue square", num_images=3)
    assert seen == {"prior": (2.5, 5), "decoder": (3.0, 6, 2)}
    with pytest.raises(Recorded):
        pipe.interpolate("a red circle", "a blue square", num_images=3, prior_guidance_scale=7.0,
                         num_inference_steps=4, super_res_num_inference_steps=3)
    assert seen == {"prior": (7.0, 5), "decoder": (3.0, 4, 3)}
    with pytest.raises(Recorded):
        pipe.sample_best_of_n("a red circle", decoder_guidance_scale=1.5)
    assert seen["best_of_n"] == (2.5, 1.5, 5, 6, 2)
    pipe.sampling_defaults = {}   # a model without settings: Karlo's
    with pytest.raises(Recorded):
        pipe.sample_best_of_n("a red circle")
    assert seen["best_of_n"] == (4.0, 8.0, 25, 25, 7)


def test_super_res_can_start_from_the_noised_upsampled_image(tiny_folder):
    import dataclasses

    import jax
    import jax.numpy as jnp

    import unclip_jax
    from unclip_jax import sampling
    pipe = unclip_jax.UnCLIPPipeline.from_pretrained(tiny_folder)
    small = jax.random.uniform(jax.random.key(0), (2, 16, 16, 3), minval=-0.8, maxval=0.8)
    cond = sampling.upsample(small, 32)
    run = lambda stages: sampling.sample_super_res(stages, pipe.params, small, jax.random.key(1), num_steps=7)
    karlo = run(pipe.stages)                                   # from pure noise at t = 999 (random weights)
    last_only = run(dataclasses.replace(pipe.stages, super_res_start_timestep=0))
    mid = run(dataclasses.replace(pipe.stages, super_res_start_timestep=400))   # starts at t = 333
    err = lambda x: float(jnp.abs(x - cond).mean())
    # t = 0 keeps sqrt(1 - abar_0) = 0.006 of noise: one step from there stays on the image whatever the weights.
    assert err(last_only) < 0.05 < err(karlo)
    assert err(last_only) < err(mid) < err(karlo)
    assert dataclasses.replace(pipe.stages, super_res_start_timestep=0) != pipe.stages   # a different program


def test_recipe_data_step_builds_the_prior_dataset_too(tmp_path, own_tempdir):
    """The prior trains on its own dataset (configs/demo.py:prior reads it): the same first scenes, captions saying
    sizes and positions less often; a second run finds both built and rebuilds nothing."""
    from unclip_jax.data import load_dataset
    from unclip_jax.demo import recipe
    recipe.step_data(tmp_path, smoke=True)
    main, prior = load_dataset(tmp_path / "data"), load_dataset(tmp_path / "data_prior")
    assert {k: v.num_examples for k, v in prior.info.splits.items()} == {"train": recipe.SMOKE_PRIOR_DATA["train"]}
    assert set(main.info.splits) == {"train", "test", "heldout"}
    by_key = lambda b: {ex["key"]: ex for ex in b.as_data_source("train")}
    a, b = by_key(main), by_key(prior)
    omit = recipe.SMOKE_PRIOR_DATA["omit"]
    for key, ex in a.items():
        assert np.array_equal(ex["image"], b[key]["image"])
        scene = list(shapes.split_scenes("train", int(key.decode().split("/")[1]) + 1, omit=omit))[-1]
        assert b[key]["caption"].decode() == shapes.caption(scene)
    assert sum(a[k]["caption"] != b[k]["caption"] for k in a) > len(a) / 4   # captions differ, images do not
    stamp = [(p, p.stat().st_mtime_ns) for p in sorted(tmp_path.rglob("*.array_record*"))]
    recipe.step_data(tmp_path, smoke=True)
    assert [(p, p.stat().st_mtime_ns) for p in sorted(tmp_path.rglob("*.array_record*"))] == stamp
    configs = recipe.load_configs()
    assert configs.get_config(f"prior,root={tmp_path}").data == str(tmp_path / "data_prior")
    assert configs.get_config(f"decoder,root={tmp_path}").data == str(tmp_path / "data")


def test_assemble_takes_the_decoder_scheduler_the_decoder_stage_exported(tmp_path):
    """The decoder stage exports decoder_scheduler/ (what its model predicts); assemble uses it, else Karlo's."""
    import dataclasses

    from unclip_jax.demo import recipe
    from unclip_jax.diffusion import scheduler as sch
    from unclip_jax.training.stages import write_scheduler
    for part in ("clip/export/text_encoder", "clip/export/image_encoder", "clip/export/tokenizer",
                 "clip/export/feature_extractor", "prior/export/prior", "decoder/export/decoder",
                 "decoder/export/text_proj", "upsampler/export/super_res_first"):
        (tmp_path / part).mkdir(parents=True)
        (tmp_path / part / "config.json").write_text("{}")
    read = lambda: json.loads((tmp_path / "model/decoder_scheduler/scheduler_config.json").read_text())
    recipe.step_assemble(tmp_path)
    assert read()["prediction_type"] == "epsilon" and read()["variance_type"] == "learned_range"
    write_scheduler(tmp_path / "decoder/export/decoder_scheduler",
                    dataclasses.replace(sch.DECODER, prediction_type="sample"))
    recipe.step_assemble(tmp_path)
    assert read()["prediction_type"] == "sample"
    assert sch.SchedulerConfig.from_diffusers(read()) == dataclasses.replace(sch.DECODER, prediction_type="sample")
    assert json.loads((tmp_path / "model/unclip_jax.json").read_text()) == recipe.DEMO_SETTINGS


def test_installed_weights_are_float16_and_load_as_float32(tmp_path):
    from safetensors.numpy import load_file, save_file

    from unclip_jax.convert.io import SafetensorsReader
    from unclip_jax.demo.recipe import to_float16
    x = np.random.default_rng(0).standard_normal((3, 5)).astype(np.float32)
    (tmp_path / "c").mkdir()
    save_file({"w": x, "steps": np.arange(3)}, str(tmp_path / "c" / "m.safetensors"))
    to_float16(tmp_path)
    out = load_file(str(tmp_path / "c" / "m.safetensors"))
    assert out["w"].dtype == np.float16 and out["steps"].dtype == np.arange(3).dtype
    np.testing.assert_allclose(out["w"], x, atol=2e-3)
    assert SafetensorsReader(tmp_path / "c" / "m.safetensors").get("w").dtype == np.float16   # the loader casts


def test_install_copies_float16_weights_and_a_report_without_machine_paths(tmp_path):
    from safetensors.numpy import load_file, save_file

    from unclip_jax.demo import evaluate as ev
    from unclip_jax.demo import recipe
    model = tmp_path / "work" / "model"
    (model / "decoder").mkdir(parents=True)
    (model / "model_index.json").write_text("{}")
    save_file({"w": np.ones((2, 2), np.float32)}, str(model / "decoder" / "m.safetensors"))
    (model / "evaluation").mkdir()
    (model / "evaluation" / "report.json").write_text(json.dumps({"model": str(model), "folder": str(model)}))
    dest = recipe.install(tmp_path / "work", tmp_path / "installed")
    assert load_file(str(dest / "decoder" / "m.safetensors"))["w"].dtype == np.float16
    assert not (dest / "evaluation").exists()
    assert json.loads((dest / "evaluation.json").read_text())["folder"] == "<workdir>/model"
    with pytest.raises(FileNotFoundError, match="no assembled model"):
        recipe.install(tmp_path / "elsewhere", tmp_path / "x")
    from unclip_jax.demo import MODEL_DIR
    assert ev._folder_name(MODEL_DIR) == "unclip_jax/demo/model"
    assert ev._folder_name(tmp_path) == str(tmp_path)


def _files(folder):
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_from_model_takes_the_stages_not_retrained_and_keeps_what_a_run_trained(tmp_path):
    """--from-model demo --steps assemble reassembles the shipped folder file for file; seeding never overwrites
    an export already in the workdir, says where each seeded stage came from, and names what a model lacks."""
    import shutil

    from unclip_jax.demo import MODEL_DIR, recipe
    work = tmp_path / "work"
    assert recipe.main(["--workdir", str(work), "--steps", "assemble", "--from-model", "demo"]) == 0
    shipped = {k: v for k, v in _files(MODEL_DIR).items() if k != "evaluation.json"}
    assert _files(work / "model") == shipped
    assert json.loads((work / "decoder/seeded_from.json").read_text())["model"] == "demo"
    assert (work / "tokenizer/vocab.json").read_bytes() == (MODEL_DIR / "tokenizer/vocab.json").read_bytes()

    # A stage with its own export keeps it; only the missing stage is taken.
    mine = work / "prior/export/prior/config.json"
    mine.write_text('{"trained": "here"}')
    shutil.rmtree(work / "decoder")
    assert recipe.seed_from_model(work, "demo", ["prior", "decoder"]) == ["decoder"]
    assert mine.read_text() == '{"trained": "here"}'
    assert (work / "decoder/export/decoder_scheduler/scheduler_config.json").exists()
    assert not (work / "decoder/export.partial").exists()

    # A stage being retrained is not seeded: assemble then says what is missing.
    other = tmp_path / "other"
    recipe.seed_from_model(other, MODEL_DIR, ["clip", "prior", "upsampler"])
    with pytest.raises(FileNotFoundError, match="decoder/export/decoder"):
        recipe.step_assemble(other)

    partial = tmp_path / "partial"
    shutil.copytree(MODEL_DIR / "prior", partial / "prior")
    with pytest.raises(FileNotFoundError, match="no decoder, decoder_scheduler, text_proj folder"):
        recipe.seed_from_model(tmp_path / "w2", partial, ["prior", "decoder"])
    assert not (tmp_path / "w2" / "prior" / "export").exists()   # checked before anything is copied
    with pytest.raises(ValueError, match="trained stages only"):
        recipe.seed_from_model(tmp_path / "w3", MODEL_DIR, ["embed"])
