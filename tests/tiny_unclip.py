"""A tiny random-weight diffusers unCLIP stack, built and saved inside the tests (no hub access).

Shapes are small but not degenerate: 2 prompts x 2 images, 16x16 decoder, 32x32 super-res, a text
length of 20 tokens, a byte-level CLIP tokenizer written on the fly.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from parity import randomize_

D = 16          # CLIP embedding dim = text hidden size = prior embedding_dim
TEXT_LEN = 20   # tokenizer model_max_length = text positions = prior num_embeddings
SIZE = 16       # decoder sample size; super-res is 2x


def _bytes_to_unicode():
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return [chr(c) for c in cs]


def write_tokenizer(folder: Path, max_length: int = TEXT_LEN) -> Path:
    """A valid CLIP BPE tokenizer with only byte tokens (and a few merges); '!' is id 0 as in Karlo's."""
    from transformers import CLIPTokenizer
    chars = _bytes_to_unicode()
    merges = ["r e", "c i", "l e</w>", "o n</w>"]
    vocab = chars + [c + "</w>" for c in chars] + ["re", "ci", "le</w>", "on</w>", "<|startoftext|>", "<|endoftext|>"]
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vocab.json").write_text(json.dumps({tok: i for i, tok in enumerate(vocab)}))
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n")
    tok = CLIPTokenizer(str(folder / "vocab.json"), str(folder / "merges.txt"), pad_token="!",
                        model_max_length=max_length)
    tok.save_pretrained(str(folder))
    return folder


def build(root: Path, seed: int = 0, *, dim: int = D, text_len: int = TEXT_LEN, size: int = SIZE,
          channels: tuple[int, ...] = (16, 24), layers_per_block: int = 1, groups: int = 8, head_dim: int = 8,
          prior_heads: int = 2, prior_head_dim: int = 6, prior_layers: int = 2, text_layers: int = 2,
          cross: int = 20):
    """Saves a diffusers UnCLIPPipeline (+ the variation pipeline's extra parts) under root; returns
    (text-to-image pipeline, image-variation pipeline), both torch, float32, eval mode.

    The keyword arguments size the stack (benchmarks use larger ones); the defaults are the tests'.
    """
    D, TEXT_LEN, SIZE = dim, text_len, size
    from diffusers import PriorTransformer, UnCLIPImageVariationPipeline, UnCLIPPipeline, UnCLIPScheduler
    from diffusers import UNet2DConditionModel, UNet2DModel
    from diffusers.pipelines.deprecated.unclip.text_proj import UnCLIPTextProjModel
    from transformers import (CLIPImageProcessor, CLIPTextConfig, CLIPTextModelWithProjection, CLIPTokenizer,
                              CLIPVisionConfig, CLIPVisionModelWithProjection)

    torch.manual_seed(seed)
    tokenizer = CLIPTokenizer.from_pretrained(str(write_tokenizer(root / "_tokenizer", TEXT_LEN)))
    text_encoder = CLIPTextModelWithProjection(CLIPTextConfig(
        vocab_size=len(tokenizer), hidden_size=D, intermediate_size=37, num_hidden_layers=text_layers,
        num_attention_heads=2,
        max_position_embeddings=TEXT_LEN, projection_dim=D, hidden_act="quick_gelu", eos_token_id=2,
        bos_token_id=tokenizer.bos_token_id, pad_token_id=0))
    prior = PriorTransformer(num_attention_heads=prior_heads, attention_head_dim=prior_head_dim,
                             num_layers=prior_layers, embedding_dim=D, num_embeddings=TEXT_LEN, additional_embeddings=4)
    n = len(channels)
    time_dim = channels[0] * 4
    text_proj = UnCLIPTextProjModel(clip_extra_context_tokens=3, clip_embeddings_dim=D, time_embed_dim=time_dim,
                                    cross_attention_dim=cross)
    decoder = UNet2DConditionModel(
        sample_size=SIZE, in_channels=3, out_channels=6, block_out_channels=channels,
        layers_per_block=layers_per_block,
        down_block_types=("ResnetDownsampleBlock2D",) + ("SimpleCrossAttnDownBlock2D",) * (n - 1),
        up_block_types=("SimpleCrossAttnUpBlock2D",) * (n - 1) + ("ResnetUpsampleBlock2D",),
        mid_block_type="UNetMidBlock2DSimpleCrossAttn", attention_head_dim=head_dim, cross_attention_dim=cross,
        class_embed_type="identity", resnet_time_scale_shift="scale_shift", norm_num_groups=groups)

    def super_res():
        return UNet2DModel(sample_size=2 * SIZE, in_channels=6, out_channels=3, block_out_channels=channels,
                           layers_per_block=layers_per_block, down_block_types=("ResnetDownsampleBlock2D",) * n,
                           up_block_types=("ResnetUpsampleBlock2D",) * n, add_attention=False,
                           norm_num_groups=groups)

    image_encoder = CLIPVisionModelWithProjection(CLIPVisionConfig(
        hidden_size=20, intermediate_size=30, num_hidden_layers=2, num_attention_heads=2, image_size=32,
        patch_size=8, projection_dim=D, hidden_act="quick_gelu"))
    feature_extractor = CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})

    models = dict(prior=prior, text_encoder=text_encoder, text_proj=text_proj, decoder=decoder,
                  super_res_first=super_res(), super_res_last=super_res(), image_encoder=image_encoder)
    for i, m in enumerate(models.values()):
        randomize_(m, seed=seed + i)
    with torch.no_grad():  # a prior whose outputs are O(1), not saturated by the clip range
        models["prior"].clip_std.copy_(0.5 + 0.5 * torch.rand(1, D))

    schedulers = dict(
        prior_scheduler=UnCLIPScheduler(variance_type="fixed_small_log", prediction_type="sample",
                                        clip_sample_range=5.0),
        decoder_scheduler=UnCLIPScheduler(variance_type="learned_range", prediction_type="epsilon",
                                          clip_sample_range=1.0),
        super_res_scheduler=UnCLIPScheduler(variance_type="fixed_small_log", prediction_type="epsilon",
                                            clip_sample_range=1.0))
    t2i = UnCLIPPipeline(tokenizer=tokenizer, **{k: v for k, v in models.items() if k != "image_encoder"},
                         **schedulers)
    t2i.save_pretrained(root / "unclip")
    variation = UnCLIPImageVariationPipeline(
        tokenizer=tokenizer, feature_extractor=feature_extractor,
        **{k: v for k, v in models.items() if k != "prior"},
        decoder_scheduler=schedulers["decoder_scheduler"], super_res_scheduler=schedulers["super_res_scheduler"])
    variation.save_pretrained(root / "variation")
    return t2i, variation
