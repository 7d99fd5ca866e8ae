"""Checkpoint loading and saving: formats, the hub cache, and clear errors for every kind of bad file."""

import json
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from diffusers.pipelines.deprecated.unclip.text_proj import UnCLIPTextProjModel

import unclip_jax
from unclip_jax import CheckpointError
from unclip_jax.convert.mapping import flax_path_to_key
from unclip_jax.models import abstract_params, from_config
from parity import assert_close, randomize_


def make_text_proj(seed=0):
    return randomize_(UnCLIPTextProjModel(clip_extra_context_tokens=2, clip_embeddings_dim=6, time_embed_dim=5,
                                          cross_attention_dim=7), seed=seed)


@pytest.fixture
def saved(tmp_path):
    ref = make_text_proj()
    ref.save_pretrained(tmp_path / "text_proj")
    return tmp_path, ref


def outputs(module, params):
    x = np.linspace(-1, 1, 2 * 6, dtype=np.float32).reshape(2, 6)
    h = np.linspace(-1, 1, 2 * 3 * 6, dtype=np.float32).reshape(2, 3, 6)
    return module.apply({"params": params}, x, x, h, False)


def reference_outputs(ref):
    x = torch.linspace(-1, 1, 12).reshape(2, 6)
    h = torch.linspace(-1, 1, 36).reshape(2, 3, 6)
    with torch.no_grad():
        return ref(image_embeddings=x, prompt_embeds=x, text_encoder_hidden_states=h, do_classifier_free_guidance=False)


def test_key_mapping_follows_the_table():
    assert flax_path_to_key("down_blocks_0/resnets_1/conv1/kernel")[0] == "down_blocks.0.resnets.1.conv1.weight"
    assert flax_path_to_key("time_embedding/linear_1/bias")[0] == "time_embedding.linear_1.bias"
    assert flax_path_to_key("transformer_blocks_3/attn1/to_out_0/kernel")[0] == "transformer_blocks.3.attn1.to_out.0.weight"
    assert flax_path_to_key("norm_out/scale")[0] == "norm_out.weight"


@pytest.mark.parametrize("fmt", ["safetensors", "bin", "sharded", "bf16"])
def test_every_weight_format_loads(tmp_path, fmt):
    ref = make_text_proj()
    if fmt == "bf16":
        ref = ref.to(torch.bfloat16)
    ref.save_pretrained(tmp_path / "text_proj", safe_serialization=fmt != "bin",
                        max_shard_size=200 if fmt == "sharded" else "10GB")
    if fmt == "sharded":
        assert (tmp_path / "text_proj" / "diffusion_pytorch_model.safetensors.index.json").exists()
    module, params = unclip_jax.load_component(tmp_path, "text_proj")
    ref = ref.float()
    for got, want in zip(outputs(module, params), reference_outputs(ref)):
        assert_close(got, want, tol=1e-6)


def test_a_component_folder_loads_directly(saved):
    root, ref = saved
    module, params = unclip_jax.load_component(root / "text_proj", "text_proj")
    assert_close(outputs(module, params)[0], reference_outputs(ref)[0])


def test_hub_id_is_read_from_the_local_cache_offline(saved, tmp_path, monkeypatch):
    root, ref = saved
    import huggingface_hub.constants as hf_constants
    monkeypatch.setattr(hf_constants, "HF_HUB_OFFLINE", True)
    cache = tmp_path / "hub"
    snapshot = cache / "models--someone--tiny-unclip" / "snapshots" / "0123456789abcdef0123456789abcdef01234567"
    shutil.copytree(root / "text_proj", snapshot / "text_proj")
    (snapshot / "model_index.json").write_text(json.dumps({"_class_name": "UnCLIPPipeline"}))
    (cache / "models--someone--tiny-unclip" / "refs").mkdir()
    (cache / "models--someone--tiny-unclip" / "refs" / "main").write_text(snapshot.name)
    module, params = unclip_jax.load_component("someone/tiny-unclip", "text_proj", cache_dir=cache)
    assert_close(outputs(module, params)[0], reference_outputs(ref)[0])
    with pytest.raises(CheckpointError, match="someone/not-cached.*HF_HUB_OFFLINE"):
        unclip_jax.load_component("someone/not-cached", "text_proj", cache_dir=cache)


def test_missing_weight_file_is_named(saved):
    root, _ = saved
    (root / "text_proj" / "diffusion_pytorch_model.safetensors").unlink()
    with pytest.raises(CheckpointError, match="no weight file in .*text_proj.*diffusion_pytorch_model.safetensors"):
        unclip_jax.load_component(root, "text_proj")


def test_missing_component_is_named(saved):
    root, _ = saved
    with pytest.raises(CheckpointError, match="has no component 'prior'"):
        unclip_jax.load_component(root, "prior")
    with pytest.raises(CheckpointError, match="neither an existing folder nor a hub id"):
        unclip_jax.load_component(root / "nowhere" / "at" / "all", "prior")


@pytest.mark.parametrize("keep", [100, 7, 3])
def test_truncated_safetensors_is_reported_as_truncated(saved, keep):
    root, _ = saved
    path = root / "text_proj" / "diffusion_pytorch_model.safetensors"
    data = path.read_bytes()
    path.write_bytes(data[:keep] if keep < 10 else data[:-keep])
    with pytest.raises(CheckpointError, match="(truncated|corrupt).*" if keep < 10 else "truncated"):
        unclip_jax.load_component(root, "text_proj")


def test_corrupt_header_and_config_are_reported(saved):
    root, _ = saved
    (root / "text_proj" / "config.json").write_text("{not json")
    with pytest.raises(CheckpointError, match="config.json is not valid JSON"):
        unclip_jax.load_component(root, "text_proj")


def test_corrupt_bin_is_reported(tmp_path):
    make_text_proj().save_pretrained(tmp_path / "text_proj", safe_serialization=False)
    path = tmp_path / "text_proj" / "diffusion_pytorch_model.bin"
    path.write_bytes(path.read_bytes()[:200])
    with pytest.raises(CheckpointError, match="could not be read as a PyTorch checkpoint"):
        unclip_jax.load_component(tmp_path, "text_proj")


def test_missing_unexpected_and_misshaped_keys_are_all_listed(saved):
    root, _ = saved
    from safetensors.numpy import load_file, save_file
    path = root / "text_proj" / "diffusion_pytorch_model.safetensors"
    state = load_file(path)
    del state["embedding_proj.bias"]
    state["extra.weight"] = np.zeros(3, np.float32)
    state["encoder_hidden_states_proj.weight"] = np.zeros((7, 5), np.float32)
    save_file(state, path, metadata={"format": "pt"})
    with pytest.raises(CheckpointError) as info:
        unclip_jax.load_component(root, "text_proj")
    msg = str(info.value)
    assert "1 missing key(s): embedding_proj.bias" in msg
    assert "1 unexpected key(s): extra.weight" in msg
    assert "encoder_hidden_states_proj.weight: checkpoint (7, 5), model expects (7, 6)" in msg


def test_config_of_another_class_is_rejected(saved):
    root, _ = saved
    with pytest.raises(CheckpointError, match="expects a config of class PriorTransformer"):
        shutil.copytree(root / "text_proj", root / "prior")
        unclip_jax.load_component(root, "prior")


def test_loading_can_place_each_tensor_as_it_is_converted(saved):
    root, _ = saved
    placed = []

    def put(path, array):
        placed.append(path)
        return jax.device_put(array.astype(np.float32))

    module, params = unclip_jax.load_component(root, "text_proj", put=put, param_dtype=jnp.bfloat16)
    assert len(placed) == len(jax.tree_util.tree_leaves(params)) == 11
    assert sorted(placed)[0] == "clip_extra_context_tokens_proj/bias"


def test_loading_in_bfloat16_keeps_parameters_in_bfloat16(saved):
    root, ref = saved
    module, params = unclip_jax.load_component(root, "text_proj", dtype=jnp.bfloat16, param_dtype=jnp.bfloat16)
    assert {p.dtype for p in jax.tree_util.tree_leaves(params)} == {jnp.dtype(jnp.bfloat16)}
    got = outputs(module, params)[0]
    assert np.max(np.abs(np.asarray(got, np.float32) - reference_outputs(ref)[0].numpy())) < 0.05


def test_save_component_round_trip_is_exact_and_writes_no_temp_files(saved, tmp_path):
    root, ref = saved
    module, params = unclip_jax.load_component(root, "text_proj")
    out = unclip_jax.save_component(tmp_path / "out", "text_proj", module, params)
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "diffusion_pytorch_model.safetensors"]
    again = UnCLIPTextProjModel.from_pretrained(out)
    for k, v in ref.state_dict().items():
        assert torch.equal(v, again.state_dict()[k]), k


TINY_CONFIGS = {
    "prior": {"num_attention_heads": 2, "attention_head_dim": 4, "num_layers": 1, "embedding_dim": 6,
              "num_embeddings": 5},
    "text_proj": {"clip_extra_context_tokens": 2, "clip_embeddings_dim": 6, "time_embed_dim": 5,
                  "cross_attention_dim": 7},
    "decoder": {"_class_name": "UNet2DConditionModel", "sample_size": 16, "in_channels": 3, "out_channels": 6,
                "block_out_channels": [16, 24], "layers_per_block": 1,
                "down_block_types": ["ResnetDownsampleBlock2D", "SimpleCrossAttnDownBlock2D"],
                "up_block_types": ["SimpleCrossAttnUpBlock2D", "ResnetUpsampleBlock2D"],
                "mid_block_type": "UNetMidBlock2DSimpleCrossAttn", "attention_head_dim": 8,
                "cross_attention_dim": 20, "class_embed_type": "identity", "resnet_time_scale_shift": "scale_shift",
                "norm_num_groups": 8},
    "super_res_first": {"_class_name": "UNet2DModel", "sample_size": 32, "in_channels": 6, "out_channels": 3,
                        "block_out_channels": [16, 24], "layers_per_block": 1,
                        "down_block_types": ["ResnetDownsampleBlock2D"] * 2,
                        "up_block_types": ["ResnetUpsampleBlock2D"] * 2, "add_attention": False,
                        "norm_num_groups": 8},
    "text_encoder": {"model_type": "clip_text_model", "hidden_size": 16, "intermediate_size": 37,
                     "num_hidden_layers": 1, "num_attention_heads": 2, "max_position_embeddings": 20,
                     "vocab_size": 100, "projection_dim": 16},
    "image_encoder": {"model_type": "clip_vision_model", "hidden_size": 20, "intermediate_size": 30,
                      "num_hidden_layers": 1, "num_attention_heads": 2, "image_size": 32, "patch_size": 8,
                      "projection_dim": 16},
}


@pytest.mark.parametrize("name,config", list(TINY_CONFIGS.items()))
def test_every_parameter_has_logical_axes(name, config):
    shapes, axes = abstract_params(from_config(name, config))
    for shape, spec in zip(jax.tree_util.tree_leaves(shapes), jax.tree_util.tree_leaves(
            axes, is_leaf=lambda x: isinstance(x, jax.sharding.PartitionSpec))):
        assert isinstance(spec, jax.sharding.PartitionSpec) and len(spec) == len(shape.shape)
