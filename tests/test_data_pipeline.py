"""The embed job and the per-stage sources, on a tiny random CLIP stack and a small built dataset."""

import io
import json
import os
import subprocess
import sys
from pathlib import Path

import jax
import ml_collections
import numpy as np
import pytest
import tensorflow_datasets as tfds
from PIL import Image

import tiny_unclip
from unclip_jax.data import (EmbeddingStore, build_dataset, decoder_source, embed, load_clip_stats, load_dataset,
                             make_source, prior_source, upsampler_source)
from unclip_jax.data.degrade import random_crop_box
from unclip_jax.data.sources import load_crop

N = 26  # examples kept: two hosts get 13 each, batches of 4 straddle epochs
BATCH = 8
LONG = "a very long caption that is far longer than the tiny tokenizer's twenty tokens allow"


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("data")
    tiny_unclip.build(root / "model")
    photos = root / "photos"
    photos.mkdir()
    rng = np.random.default_rng(0)
    for i in range(N):
        h, w = int(rng.integers(64, 120)), int(rng.integers(64, 120))
        image = Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8))
        if i % 5 == 0:
            image = image.convert("L")  # converted by the build, embedded like the rest
        image.save(photos / f"{i:03d}.jpg")
        (photos / f"{i:03d}.txt").write_text(LONG if i == 7 else f"photo {i}")
    (photos / "broken.jpg").write_bytes(b"\xff\xd8\xff" + b"0" * 100)
    (photos / "broken.txt").write_text("never kept")
    report = build_dataset(photos, root / "ds", verbose=False)
    assert report.kept == N and report.skipped == {"unreadable image": 1}
    towers = embed.load_towers(str(root / "model" / "variation"))
    result = embed.embed_dataset("tiny", root / "ds", root / "ds" / "embeddings", batch_size=BATCH, towers=towers,
                                 progress=False)
    assert result.complete and result.done_now == N
    return {"root": root, "model": root / "model" / "variation", "ds": root / "ds", "towers": towers,
            "emb": root / "ds" / "embeddings", "result": result}


def _direct(world):
    """The towers applied directly: transformers' tokenizer and image processor, then the Flax modules."""
    if "direct" not in world:
        world["direct"] = _apply_towers(world)
    return world["direct"]


def _apply_towers(world):
    towers = world["towers"]
    ds = load_dataset(world["ds"]).as_data_source("train")
    captions = [ds[i]["caption"].decode() for i in range(N)]
    tok = towers.tokenizer(captions, padding="max_length", max_length=towers.text_len, truncation=True,
                           return_tensors="np")
    images = [Image.fromarray(ds[i]["image"]) for i in range(N)]
    pixels = towers.processor(images=images, return_tensors="np").pixel_values.transpose(0, 2, 3, 1)
    text = jax.jit(towers.text.apply)({"params": towers.text_params}, tok.input_ids, tok.attention_mask)
    image = jax.jit(towers.image.apply)({"params": towers.image_params}, pixels)
    return tok, text, image


# ------------------------------------------------------------------------------------------------ embed

def test_embed_outputs_equal_the_clip_towers_applied_directly(world):
    tok, text, image = _direct(world)
    got = EmbeddingStore(world["emb"]).gather(np.arange(N))
    np.testing.assert_array_equal(got["input_ids"], tok.input_ids)
    np.testing.assert_array_equal(got["attention_mask"], tok.attention_mask.astype(bool))
    np.testing.assert_allclose(got["text_embeds"], text.text_embeds, atol=1e-5, rtol=1e-5)
    np.testing.assert_allclose(got["image_embeds"], image.image_embeds, atol=1e-5, rtol=1e-5)
    assert world["result"].truncated == 1  # the long caption, kept and truncated as the pipelines do


def test_clip_stats_are_the_mean_and_std_of_the_image_and_text_embeddings(world):
    stats = load_clip_stats(world["emb"])
    got = EmbeddingStore(world["emb"]).gather(np.arange(N))
    for k in ("image_embeds", "text_embeds"):
        assert stats[f"{k}_mean"].shape == (1, world["towers"].embed_dim)
        np.testing.assert_allclose(stats[f"{k}_mean"][0], got[k].mean(0), rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(stats[f"{k}_std"][0], got[k].std(0), rtol=1e-4, atol=1e-6)


def test_an_interrupted_embed_job_resumes_where_it_stopped(world, tmp_path, monkeypatch):
    out = tmp_path / "emb"
    write = embed._write_rows
    calls = []

    def crash_on_third_batch(*args):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt  # the job is killed while writing its third batch
        write(*args)

    monkeypatch.setattr(embed, "_write_rows", crash_on_third_batch)
    with pytest.raises(KeyboardInterrupt):
        embed.embed_dataset("tiny", world["ds"], out, batch_size=BATCH, towers=world["towers"], progress=False)
    monkeypatch.setattr(embed, "_write_rows", write)
    assert json.loads((out / "part-00000-of-00001" / "progress.json").read_text())["done"] == 2 * BATCH
    with pytest.raises(ValueError, match="incomplete"):
        EmbeddingStore(out)

    resumed = embed.embed_dataset("tiny", world["ds"], out, batch_size=BATCH, towers=world["towers"], progress=False)
    assert resumed.done_now == N - 2 * BATCH and resumed.complete and resumed.truncated == 1
    full, again = EmbeddingStore(world["emb"]).gather(np.arange(N)), EmbeddingStore(out).gather(np.arange(N))
    for k in full:
        np.testing.assert_array_equal(again[k], full[k])
    assert resumed.stats == json.loads((world["emb"] / "clip_stats.json").read_text())


def test_a_time_limited_embed_job_continues_on_the_next_run(world, tmp_path):
    out = tmp_path / "emb"
    first = embed.embed_dataset("tiny", world["ds"], out, batch_size=BATCH, towers=world["towers"], max_batches=1,
                                progress=False)
    assert (first.done_now, first.complete, first.stats) == (BATCH, False, None)
    rest = embed.embed_dataset("tiny", world["ds"], out, batch_size=BATCH, towers=world["towers"], progress=False)
    assert rest.done_now == N - BATCH and rest.complete
    np.testing.assert_array_equal(EmbeddingStore(out).gather(np.arange(N))["image_embeds"],
                                  EmbeddingStore(world["emb"]).gather(np.arange(N))["image_embeds"])


def test_embed_refuses_to_resume_with_different_settings(world, tmp_path):
    out = tmp_path / "emb"
    embed.embed_dataset("tiny", world["ds"], out, batch_size=BATCH, towers=world["towers"], max_batches=1,
                        progress=False)
    with pytest.raises(ValueError, match="made differently.*fields"):
        embed.embed_dataset("tiny", world["ds"], out, batch_size=BATCH, towers=world["towers"],
                            store_hidden_states=True, progress=False)


def test_stored_text_hidden_states_are_the_text_towers_in_float16(world, tmp_path):
    out = tmp_path / "emb"
    embed.embed_dataset("tiny", world["ds"], out, batch_size=BATCH, towers=world["towers"], store_hidden_states=True,
                        progress=False)
    _, text, _ = _direct(world)
    hidden = EmbeddingStore(out).gather(np.arange(N))["text_hidden_states"]
    assert hidden.dtype == np.float16
    np.testing.assert_allclose(hidden.astype(np.float32), text.last_hidden_state, atol=1e-2, rtol=1e-3)
    batch = next(prior_source(world["ds"], embeddings=out, global_batch=4, process_index=0, process_count=1))
    assert batch["text_hidden_states"].shape == (4, world["towers"].text_len, world["towers"].hidden_dim)


def test_bf16_towers_give_embeddings_close_to_fp32(world, tmp_path):
    towers = embed.load_towers(str(world["model"]), dtype="bf16")
    embed.embed_dataset("tiny", world["ds"], tmp_path / "emb", batch_size=BATCH, dtype="bf16", towers=towers,
                        progress=False)
    got = EmbeddingStore(tmp_path / "emb").gather(np.arange(N))
    ref = EmbeddingStore(world["emb"]).gather(np.arange(N))
    assert got["image_embeds"].dtype == np.float32
    for k in ("image_embeds", "text_embeds"):
        cos = (got[k] * ref[k]).sum(1) / np.linalg.norm(got[k], axis=1) / np.linalg.norm(ref[k], axis=1)
        assert cos.min() > 0.99, k


def test_cli_embed_runs_the_job_and_reports_it(world, tmp_path, capsys):
    from unclip_jax.data import cli
    assert cli.main(["data", "embed", "--model", str(world["model"]), "--dataset", str(world["ds"]),
                     "--out", str(tmp_path / "emb"), "--batch-size", str(BATCH)]) == 0
    printed = capsys.readouterr().out
    assert f"{N} example(s) embedded" in printed and "complete" in printed and "1 caption(s) truncated" in printed
    np.testing.assert_allclose(EmbeddingStore(tmp_path / "emb").gather(np.arange(N))["image_embeds"],
                               EmbeddingStore(world["emb"]).gather(np.arange(N))["image_embeds"], atol=1e-6)


# ------------------------------------------------------------------------------------------------ sources

def _smooth_photo(h=300, w=375):
    small = np.random.default_rng(0).uniform(0, 255, (12, 15, 3)).astype(np.float32)
    return Image.fromarray(np.clip(np.asarray(jax.image.resize(small, (h, w, 3), "cubic")), 0, 255).astype(np.uint8))


def _encoded(image, fmt, **kw):
    buf = io.BytesIO()
    image.save(buf, format=fmt, **kw)
    return buf.getvalue()


def test_load_crop_is_resize_shorter_side_then_crop_and_jpeg_draft_stays_close():
    photo = _smooth_photo()
    resized = np.asarray(photo.resize((80, 64), Image.BICUBIC), np.float32) / 127.5 - 1  # 375 x 300 -> 80 x 64
    centre = load_crop(_encoded(photo, "PNG"), scale_to=64, crop=64)
    np.testing.assert_allclose(centre, resized[:, 8:72], atol=1e-6)
    rng = np.random.default_rng(0)
    y, x = 0, 0
    for _ in range(3):
        state = rng.bit_generator.state
        window = load_crop(_encoded(photo, "PNG"), scale_to=64, crop=32, rng=rng)
        rng.bit_generator.state = state
        y, x = random_crop_box(rng, 64, 80, 32)
        np.testing.assert_allclose(window, resized[y:y + 32, x:x + 32], atol=1e-6)
    drafted = load_crop(_encoded(photo, "JPEG", quality=95), scale_to=64, crop=64)  # decoded at 1/4 scale
    assert np.abs(drafted - centre).mean() < 0.02


def _sources(world, seed=0, **kw):
    common = dict(global_batch=4, seed=seed, process_index=0, process_count=1, return_index=True)
    return {"prior": prior_source(world["ds"], **common, **kw.get("prior", {})),
            "decoder": decoder_source(world["ds"], image_size=16, **common, **kw.get("decoder", {})),
            "upsampler": upsampler_source(world["ds"], target_size=32, degrade_on="host", **common,
                                          **kw.get("upsampler", {}))}


def test_batches_carry_the_stored_embeddings_and_the_images_of_their_examples(world):
    store = EmbeddingStore(world["emb"])
    records = load_dataset(world["ds"]).as_data_source("train", decoders={"image": tfds.decode.SkipDecoding()})
    sources = _sources(world)
    prior, decoder, up = (next(sources[k]) for k in ("prior", "decoder", "upsampler"))
    for batch in (prior, decoder):
        ref = store.gather(batch["index"])
        assert batch["input_ids"].dtype == np.int32 and batch["attention_mask"].dtype == bool
        for k in ("input_ids", "attention_mask", "text_embeds", "image_embeds"):
            np.testing.assert_array_equal(batch[k], ref[k])
    for j, i in enumerate(decoder["index"]):
        np.testing.assert_array_equal(decoder["image"][j], load_crop(records[int(i)]["image"], scale_to=16, crop=16))
    assert decoder["image"].shape == (4, 16, 16, 3) and decoder["image"].dtype == np.float32
    assert up["image"].shape == (4, 8, 8, 3) and up["low_res"].shape == (4, 2, 2, 3)
    for batch in (decoder, up):
        assert -1.0 <= batch["image"].min() and batch["image"].max() <= 1.0
    for s in sources.values():
        s.close()


def test_batches_are_deterministic_for_a_seed_and_differ_across_seeds(world):
    a, b, c = _sources(world, seed=1), _sources(world, seed=1), _sources(world, seed=2)
    for stage in a:
        x, y, z = next(a[stage]), next(b[stage]), next(c[stage])
        for k in x:
            np.testing.assert_array_equal(x[k], y[k])
        assert not np.array_equal(x["index"], z["index"])
    for s in (*a.values(), *b.values(), *c.values()):
        s.close()


def test_random_decoder_crops_move_along_the_longer_side_deterministically(world):
    kw = dict(global_batch=8, seed=0, process_index=0, process_count=1, image_size=16, return_index=True)
    with decoder_source(world["ds"], crop="random", **kw) as a, decoder_source(world["ds"], crop="random", **kw) as b, \
            decoder_source(world["ds"], **kw) as centre:
        x, y, c = next(a), next(b), next(centre)
    np.testing.assert_array_equal(x["image"], y["image"])
    assert not np.array_equal(x["image"], c["image"])


def test_iterator_state_round_trips_through_an_orbax_checkpoint(world, tmp_path):
    import orbax.checkpoint as ocp
    reference = _sources(world)
    for s in reference.values():
        for _ in range(5):  # into the second epoch (26 examples, 4 per step)
            next(s)
    states = {k: s.get_state() for k, s in reference.items()}
    expected = {k: [next(s) for _ in range(4)] for k, s in reference.items()}

    with ocp.CheckpointManager(tmp_path / "ckpt") as manager:
        manager.save(5, args=ocp.args.Composite(**{k: ocp.args.JsonSave(v) for k, v in states.items()}))
        manager.wait_until_finished()
    with ocp.CheckpointManager(tmp_path / "ckpt") as manager:
        restored = manager.restore(5, args=ocp.args.Composite(**{k: ocp.args.JsonRestore() for k in states}))

    resumed = _sources(world)
    for stage, s in resumed.items():
        next(s)  # a fresh run has already prefetched and consumed something: set_state must discard it
        s.set_state(restored[stage])
        for want in expected[stage]:
            got = next(s)
            for k in want:
                np.testing.assert_array_equal(got[k], want[k])
    for s in (*reference.values(), *resumed.values()):
        s.close()


def test_set_state_refuses_the_state_of_a_different_pipeline(world):
    source = prior_source(world["ds"], global_batch=4, seed=0, process_index=0, process_count=1)
    state = source.get_state()
    with pytest.raises(ValueError, match="global_batch: 8 in the checkpoint, 4 now"):
        source.set_state({**state, "global_batch": 8})
    source.close()


def test_make_source_reads_the_documented_config_keys(world):
    config = ml_collections.ConfigDict({"batch_size": 4, "seed": 3, "data": {
        "kind": "tfds", "dir": str(world["ds"]), "image_size": 16, "target_size": 32, "crop_size": 16,
        "low_res_factor": 4, "degrade": "bsr", "degrade_on": "host", "prefetch": 2, "workers": 2}})
    shapes = {}
    for stage in ("prior", "decoder", "super_res_first"):
        with make_source(config, stage, process_index=0, process_count=1) as source:
            shapes[stage] = {k: v.shape for k, v in next(source).items()}
    d = world["towers"].embed_dim
    assert shapes["prior"]["image_embeds"] == (4, d) and "image" not in shapes["prior"]
    assert shapes["decoder"]["image"] == (4, 16, 16, 3)
    assert shapes["super_res_first"] == {"image": (4, 16, 16, 3), "low_res": (4, 4, 4, 3)}
    config.data.kind = "synthetic"
    with make_source(config, "decoder", process_index=0, process_count=1) as source:
        batch = next(source)
    assert batch["image"].shape == (4, 16, 16, 3) and batch["input_ids"].shape == (4, 77)


def test_make_source_also_reads_the_trainers_flat_config(world):
    config = ml_collections.ConfigDict({"batch_size": 4, "seed": 0, "stage": "upsampler", "data": str(world["ds"]),
                                        "image_size": 16, "crop_size": 16, "upsample_factor": 4,
                                        "degradation": "blur"})
    with make_source(config, process_index=0, process_count=1) as source:
        assert {k: v.shape for k, v in next(source).items()} == {"image": (4, 16, 16, 3)}  # degraded on device
    with make_source(config, "decoder", process_index=0, process_count=1) as source:
        assert next(source)["image"].shape == (4, 16, 16, 3)


# Run in fresh processes: XLA_FLAGS must be set before jax starts. argv: dataset folder, number of examples.
TWO_HOSTS = """
import sys
import numpy as np, jax, tensorflow_datasets as tfds
from jax.sharding import NamedSharding, PartitionSpec as P
from unclip_jax.data import decoder_source, prior_source, load_dataset
from unclip_jax.data.sources import load_crop

folder, n = sys.argv[1], int(sys.argv[2])
assert jax.device_count() == 8
mesh = jax.make_mesh((8,), ("data",))
sharding = NamedSharding(mesh, P("data"))
devices = list(mesh.devices.flat)
records = load_dataset(folder).as_data_source("train", decoders={"image": tfds.decode.SkipDecoding()})
for make in (prior_source, decoder_source):
    kw = dict(image_size=16) if make is decoder_source else {}
    hosts = [make(folder, global_batch=8, seed=5, process_index=p, process_count=2, return_index=True, **kw)
             for p in range(2)]
    streams = [[], []]
    for step in range(13):  # 13 steps x 4 examples = 4 epochs of each host's 13-example shard
        local = [next(h) for h in hosts]
        # Each host puts its 4 examples on its own 4 devices; together they are one global batch.
        for key in ("index", "image_embeds"):
            shards = [jax.device_put(local[p][key][j:j + 1], devices[4 * p + j]) for p in range(2) for j in range(4)]
            glob = jax.make_array_from_single_device_arrays((8,) + local[0][key].shape[1:], sharding, shards)
            np.testing.assert_array_equal(np.asarray(glob), np.concatenate([local[0][key], local[1][key]]))
        for p in range(2):
            streams[p] += local[p]["index"].tolist()
        if make is decoder_source and step < 2:  # each host's own shard maps to the right global examples
            for p in range(2):
                want = load_crop(records[int(local[p]["index"][0])]["image"], scale_to=16, crop=16)
                np.testing.assert_array_equal(local[p]["image"][0], want)
    for epoch in range(4):
        seen = sum((s[13 * epoch:13 * (epoch + 1)] for s in streams), [])
        assert sorted(seen) == list(range(n)), (make.__name__, epoch, sorted(seen))
    for h in hosts:
        h.close()
print("ok")
"""

# argv: dataset folder, number of examples, model folder, the single-device embeddings.
EIGHT_DEVICE_EMBED = """
import sys, tempfile
import numpy as np, jax
from unclip_jax.data import EmbeddingStore, embed

folder, n, model, reference = sys.argv[1], int(sys.argv[2]), sys.argv[3], sys.argv[4]
assert jax.device_count() == 8
with tempfile.TemporaryDirectory() as out:
    embed.embed_dataset(model, folder, out, batch_size=8, progress=False)
    got, ref = EmbeddingStore(out).gather(np.arange(n)), EmbeddingStore(reference).gather(np.arange(n))
    for k in ref:
        np.testing.assert_allclose(got[k], ref[k], atol=1e-5, rtol=1e-5, err_msg=k)
print("ok")
"""


def _run_on_eight_devices(script: str, *args: str) -> None:
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8", JAX_PLATFORMS="cpu")
    env["PYTHONPATH"] = os.pathsep.join([str(Path(__file__).resolve().parents[1]), env.get("PYTHONPATH", "")])
    proc = subprocess.run([sys.executable, "-c", script, *args], env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0 and proc.stdout.strip().endswith("ok"), proc.stderr[-3000:]


def test_eight_devices_over_two_hosts_see_every_example_once_per_epoch(world):
    """Two simulated hosts with 4 of 8 simulated devices each: within every epoch each example appears once."""
    _run_on_eight_devices(TWO_HOSTS, str(world["ds"]), str(N))


def test_the_embed_job_splits_its_batch_over_eight_devices_and_gives_the_same_embeddings(world):
    _run_on_eight_devices(EIGHT_DEVICE_EMBED, str(world["ds"]), str(N), str(world["model"]), str(world["emb"]))
