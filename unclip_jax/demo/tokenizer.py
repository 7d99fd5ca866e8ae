"""A small CLIP tokenizer trained on the demo's captions: byte-level BPE (tokenizers library), saved in the files
transformers' CLIPTokenizer reads (vocab.json, merges.txt, tokenizer_config.json, special_tokens_map.json).

    tok = train_clip_tokenizer(captions, "out/tokenizer", vocab_size=600, max_length=32)

The vocabulary follows OpenAI's CLIP layout: the 256 byte symbols (here in byte order; OpenAI lists the printable
ones first, which tests/tiny_unclip.py reproduces), the same with the end-of-word marker "</w>", the learned merges
in order, then <|startoftext|> and <|endoftext|>. Every byte string therefore
still tokenizes (a word the captions never had falls apart into smaller pieces instead of an unknown token), and
the merges the tokenizers trainer learned are the ones CLIPTokenizer applies.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Iterable

BOS, EOS = "<|startoftext|>", "<|endoftext|>"
# CLIP's pre-tokenizer pattern (transformers' CLIPTokenizer): contractions, letters, single digits, other symbols.
CLIP_PATTERN = r"""<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+"""


def bytes_to_unicode() -> list[str]:
    """GPT-2 / CLIP's printable stand-in for each byte value 0..255."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return [chr(c) for c in (c for _, c in sorted(zip(bs, cs)))]


def train_merges(captions: Iterable[str], num_merges: int) -> list[tuple[str, str]]:
    """The BPE merges the tokenizers trainer learns from the lower-cased captions, with CLIP's word split and
    end-of-word suffix, at most num_merges of them (fewer when every word is already one token)."""
    from tokenizers import Regex, Tokenizer, models, normalizers, pre_tokenizers, trainers

    alphabet = bytes_to_unicode()
    tok = Tokenizer(models.BPE(end_of_word_suffix="</w>"))
    tok.normalizer = normalizers.Sequence([normalizers.NFC(), normalizers.Lowercase()])
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(CLIP_PATTERN), behavior="removed", invert=True),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    base = 2 * len(alphabet)
    trainer = trainers.BpeTrainer(vocab_size=base + num_merges, initial_alphabet=alphabet, end_of_word_suffix="</w>",
                                  show_progress=False, special_tokens=[])
    tok.train_from_iterator(list(captions), trainer)
    model = json.loads(tok.to_str())["model"]
    merges = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in model["merges"]]
    return merges[:num_merges]


def write_clip_tokenizer(folder: str | os.PathLike, merges: list[tuple[str, str]], *, max_length: int):
    """Writes vocab.json + merges.txt in CLIP's layout and saves them through CLIPTokenizer (its configs)."""
    from transformers import CLIPTokenizer
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    chars = bytes_to_unicode()
    vocab = chars + [c + "</w>" for c in chars]
    seen = set(vocab)
    for a, b in merges:
        if a + b not in seen:
            vocab.append(a + b)
            seen.add(a + b)
    vocab += [BOS, EOS]
    (folder / "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(vocab)}, ensure_ascii=False))
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(f"{a} {b}" for a, b in merges) + "\n",
                                       encoding="utf-8")
    # pad with <|endoftext|>, as openai/clip-vit-large-patch14 does (Karlo pads with "!", id 0; either works:
    # the attention mask hides padding).
    tok = CLIPTokenizer(str(folder / "vocab.json"), str(folder / "merges.txt"), pad_token=EOS,
                        model_max_length=max_length)
    tok.save_pretrained(str(folder))
    return CLIPTokenizer.from_pretrained(str(folder))


def train_clip_tokenizer(captions: Iterable[str], folder: str | os.PathLike, *, vocab_size: int = 600,
                         max_length: int = 32):
    """Trains the BPE and saves it as a CLIP tokenizer of about vocab_size tokens; returns the CLIPTokenizer."""
    base = 2 * 256 + 2
    if vocab_size <= base:
        raise ValueError(f"vocab_size={vocab_size}: a byte-level CLIP vocabulary has {base} tokens before any merge")
    merges = train_merges(captions, vocab_size - base)
    return write_clip_tokenizer(folder, merges, max_length=max_length)
