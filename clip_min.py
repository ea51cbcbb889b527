"""A minimal CLIP (ViT image tower + causal text tower) that loads OpenAI's official checkpoints.

Parameter names and shapes are those of OpenAI's state dict, so a checkpoint loads with strict=True and
no renaming table, and `torch.func.functional_call(model, params, ...)` takes the same dict the
checkpoint holds. Every hyper-parameter is read off tensor shapes (see `config_from_state_dict`).

The API of OpenAI's `clip` package, without torchvision, ftfy or regex: `load(name_or_path)` reads OpenAI's
TorchScript archive without executing anything from it; `tokenize(texts)` is the same byte-level BPE;
`preprocess(pil_image)` is the same resize / crop / normalize. tests/test_clip_min.py checks each against
OpenAI's code.
"""

import errno
import functools
import gzip
import hashlib
import html
import http.client
import io
import math
import os
import pickle
import re
import sys
import time
import unicodedata
import urllib.error
import urllib.request
import zipfile
from pathlib import Path

import numpy as np
import torch
from PIL import Image
import torch.nn.functional as F
from torch import nn


# ----------------------------------------------------------------------------------------------------
# The model


class LayerNorm(nn.LayerNorm):
    """LayerNorm computed in fp32 whatever the input dtype (as OpenAI's), cast back to the input dtype."""

    def forward(self, x):
        y = F.layer_norm(x.float(), self.normalized_shape, self.weight.float(), self.bias.float(), self.eps)
        return y.to(x.dtype)


def quick_gelu(x):
    """x * sigmoid(1.702 x), the GELU approximation CLIP was trained with, as one fused op: silu(1.702 x) / 1.702."""
    # in place on the temporaries (silu's backward needs only its input): no new 4x-wide tensor
    return F.silu(1.702 * x, inplace=not torch.is_grad_enabled()).div_(1.702)


class QuickGELULinear(torch.autograd.Function):
    """c_proj(quick_gelu(h)) that keeps only h for the backward and recomputes the activation there.

    Plain autograd would keep two (tokens, 4 * width) tensors per block (the activation's input and c_proj's
    input); recomputing the cheap element-wise activation halves that, the largest share of training memory."""

    @staticmethod
    @torch.amp.custom_fwd(device_type="cuda")
    def forward(ctx, h, weight, bias):
        ctx.save_for_backward(h, weight)
        return F.linear(quick_gelu(h), weight, bias)

    @staticmethod
    @torch.amp.custom_bwd(device_type="cuda")
    def backward(ctx, grad):
        h, weight = ctx.saved_tensors
        y = 1.702 * h
        grad_h = grad_weight = grad_bias = None
        if ctx.needs_input_grad[2]:
            grad_bias = grad.flatten(0, -2).sum(0)
        if ctx.needs_input_grad[1]:  # c_proj's input, recomputed: quick_gelu(h) = silu(y) / 1.702
            grad_weight = grad.flatten(0, -2).t() @ F.silu(y).div_(1.702).flatten(0, -2)  # (out, 4 * width)
        if ctx.needs_input_grad[0]:  # d quick_gelu / dh = silu'(1.702 h): aten's fused silu backward
            grad_h = torch.ops.aten.silu_backward(grad @ weight.to(grad.dtype), y)
        return grad_h, grad_weight, grad_bias


class Attention(nn.Module):
    """Multi-head self-attention with nn.MultiheadAttention's parameter names, computed by SDPA."""

    def __init__(self, width, heads):
        super().__init__()
        self.heads = heads
        self.in_proj_weight = nn.Parameter(torch.empty(3 * width, width))
        self.in_proj_bias = nn.Parameter(torch.empty(3 * width))
        self.out_proj = nn.Linear(width, width)

    def forward(self, x, attn_mask=None):
        n, length, width = x.shape  # (N, L, D), batch first
        qkv = F.linear(x, self.in_proj_weight, self.in_proj_bias)  # (N, L, 3D)
        # unbind, not qkv[0], qkv[1], qkv[2]: the backward of each index would fill a zero tensor the size of qkv
        q, k, v = qkv.view(n, length, 3, self.heads, width // self.heads).permute(2, 0, 3, 1, 4).unbind(0)  # (N, H, L, D/H)
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask)  # (N, H, L, D/H)
        y = y.transpose(1, 2).reshape(n, length, width)  # (N, L, D)
        return self.out_proj(y)


class MLP(nn.Module):
    """c_fc -> QuickGELU -> c_proj (c_proj stays an nn.Linear for its state-dict keys; see QuickGELULinear)."""

    def __init__(self, width):
        super().__init__()
        self.c_fc = nn.Linear(width, 4 * width)
        self.c_proj = nn.Linear(4 * width, width)

    def forward(self, x):
        return QuickGELULinear.apply(self.c_fc(x), self.c_proj.weight, self.c_proj.bias)


class ResidualAttentionBlock(nn.Module):
    """Pre-LN transformer block: x + attn(ln_1(x)), then x + mlp(ln_2(x))."""

    def __init__(self, width, heads):
        super().__init__()
        self.attn = Attention(width, heads)
        self.ln_1 = LayerNorm(width)
        self.mlp = MLP(width)
        self.ln_2 = LayerNorm(width)

    def forward(self, x, attn_mask=None):
        x = x + self.attn(self.ln_1(x), attn_mask)
        return x + self.mlp(self.ln_2(x))


class Transformer(nn.Module):
    def __init__(self, width, layers, heads):
        super().__init__()
        self.resblocks = nn.ModuleList([ResidualAttentionBlock(width, heads) for _ in range(layers)])

    def forward(self, x, attn_mask=None):
        for block in self.resblocks:
            x = block(x, attn_mask)
        return x


class VisionTransformer(nn.Module):
    def __init__(self, input_resolution, patch_size, width, layers, heads, output_dim):
        super().__init__()
        self.input_resolution = input_resolution
        self.conv1 = nn.Conv2d(3, width, kernel_size=patch_size, stride=patch_size, bias=False)
        self.class_embedding = nn.Parameter(torch.empty(width))
        self.positional_embedding = nn.Parameter(torch.empty((input_resolution // patch_size) ** 2 + 1, width))
        self.ln_pre = LayerNorm(width)
        self.transformer = Transformer(width, layers, heads)
        self.ln_post = LayerNorm(width)
        self.proj = nn.Parameter(torch.empty(width, output_dim))

    def forward(self, x):
        x = self.conv1(x.to(self.conv1.weight.dtype))  # (N, D, grid, grid)
        x = x.flatten(2).transpose(1, 2)  # (N, grid*grid, D)
        cls = self.class_embedding.to(x.dtype).expand(x.shape[0], 1, -1)  # (N, 1, D)
        x = torch.cat([cls, x], dim=1) + self.positional_embedding.to(x.dtype)  # (N, 1+grid*grid, D)
        x = self.transformer(self.ln_pre(x))
        return self.ln_post(x[:, 0, :]) @ self.proj  # class token -> (N, E)


class CLIP(nn.Module):
    def __init__(self, embed_dim, image_resolution, vision_layers, vision_width, vision_patch_size,
                 context_length, vocab_size, transformer_width, transformer_layers):
        super().__init__()
        self.context_length = context_length
        # the head count is not in the checkpoint: OpenAI's code uses width // 64 in both towers
        self.visual = VisionTransformer(image_resolution, vision_patch_size, vision_width, vision_layers,
                                        vision_width // 64, embed_dim)
        self.transformer = Transformer(transformer_width, transformer_layers, transformer_width // 64)
        self.token_embedding = nn.Embedding(vocab_size, transformer_width)
        self.positional_embedding = nn.Parameter(torch.empty(context_length, transformer_width))
        self.ln_final = LayerNorm(transformer_width)
        self.text_projection = nn.Parameter(torch.empty(transformer_width, embed_dim))
        self.logit_scale = nn.Parameter(torch.empty([]))

    @property
    def dtype(self):
        return self.visual.conv1.weight.dtype

    def encode_image(self, image):
        return self.visual(image)

    def encode_text(self, text):
        # a context shorter than 77 is allowed: causal attention means tokens after the end-of-text token
        # never reach its features, so callers may trim padding for speed
        x = self.token_embedding(text) + self.positional_embedding[:text.shape[1]].to(self.dtype)  # (N, L, D)
        # additive causal mask: -inf above the diagonal, so token i attends to tokens 0..i only
        mask = torch.full((x.shape[1], x.shape[1]), float("-inf"), dtype=x.dtype, device=x.device).triu(1)
        x = self.transformer(x, mask)
        x = self.ln_final(x)
        # the end-of-text token has the largest id in the vocabulary, so argmax finds it
        x = x[torch.arange(x.shape[0], device=x.device), text.argmax(dim=-1)]  # (N, D)
        return x @ self.text_projection

    def forward(self, image=None, text=None):
        """(logits_per_image, logits_per_text) as OpenAI's; with only one input, that tower's features
        (so `torch.func.functional_call(model, params, ...)` can run either tower alone)."""
        if text is None:
            return self.encode_image(image)
        if image is None:
            return self.encode_text(text)
        image_features = F.normalize(self.encode_image(image), dim=-1)
        text_features = F.normalize(self.encode_text(text), dim=-1)
        logits_per_image = self.logit_scale.exp() * image_features @ text_features.t()
        return logits_per_image, logits_per_image.t()


# ----------------------------------------------------------------------------------------------------
# Building a model from a state dict

# non-parameter tensors in OpenAI's TorchScript archives, dropped by OpenAI's own loader too
ARCHIVE_EXTRAS = ("input_resolution", "context_length", "vocab_size")


def config_from_state_dict(state_dict):
    """Every CLIP hyper-parameter, read off the tensor shapes of an official (ViT) state dict."""
    if "visual.proj" not in state_dict:
        raise ValueError("not a ViT CLIP state dict: no 'visual.proj' (ResNet CLIP models are not supported)")
    conv = state_dict["visual.conv1.weight"]  # (width, 3, patch, patch)
    grid = round((state_dict["visual.positional_embedding"].shape[0] - 1) ** 0.5)

    def count_blocks(prefix):
        return len({k[len(prefix):].split(".")[0] for k in state_dict if k.startswith(prefix)})

    return dict(
        embed_dim=state_dict["text_projection"].shape[1],
        image_resolution=conv.shape[-1] * grid,
        vision_layers=count_blocks("visual.transformer.resblocks."),
        vision_width=conv.shape[0],
        vision_patch_size=conv.shape[-1],
        context_length=state_dict["positional_embedding"].shape[0],
        vocab_size=state_dict["token_embedding.weight"].shape[0],
        transformer_width=state_dict["ln_final.weight"].shape[0],
        transformer_layers=count_blocks("transformer.resblocks."),
    )


def build_model(state_dict, source="state dict"):
    """A CLIP in eval mode holding exactly the tensors of `state_dict` (official keys), in fp32.

    Missing, extra or misshapen tensors raise one ValueError naming `source` and every problem.
    """
    state_dict = {k: v for k, v in state_dict.items() if k not in ARCHIVE_EXTRAS}
    try:
        config = config_from_state_dict(state_dict)
    except KeyError as e:
        raise ValueError(f"{source}: not a CLIP checkpoint, missing tensor {e}") from None
    except (AttributeError, IndexError, TypeError) as e:
        raise ValueError(f"{source}: not a CLIP checkpoint ({e})") from None
    except ValueError as e:
        raise ValueError(f"{source}: {e}") from None
    with torch.device("meta"):
        model = CLIP(**config)
    expected = model.state_dict()
    missing = sorted(set(expected) - set(state_dict))
    extra = sorted(set(state_dict) - set(expected))
    misshapen = [f"{k}: expected {tuple(expected[k].shape)}, got {tuple(state_dict[k].shape)}"
                 for k in expected if k in state_dict and expected[k].shape != state_dict[k].shape]
    problems = ([f"missing keys {missing[:5]}{' ...' if len(missing) > 5 else ''}"] if missing else []) \
        + ([f"unexpected keys {extra[:5]}{' ...' if len(extra) > 5 else ''}"] if extra else []) \
        + ([f"wrong shapes: {'; '.join(misshapen[:5])}"] if misshapen else [])
    if problems:
        raise ValueError(f"{source}: does not match a CLIP model of the inferred config {config}: "
                         + "; ".join(problems))
    model = model.to_empty(device="cpu")
    # fp16 storage (OpenAI's archives) is upcast: the model computes in fp32 unless the caller casts it
    model.load_state_dict({k: v.float() for k, v in state_dict.items()}, strict=True)
    return model.eval()


# Architectures of OpenAI's ViT checkpoints, and the tiny one the tests use (widths multiples of 64)
CONFIGS = {
    "ViT-B/32": dict(embed_dim=512, image_resolution=224, vision_layers=12, vision_width=768, vision_patch_size=32,
                     context_length=77, vocab_size=49408, transformer_width=512, transformer_layers=12),
    "ViT-B/16": dict(embed_dim=512, image_resolution=224, vision_layers=12, vision_width=768, vision_patch_size=16,
                     context_length=77, vocab_size=49408, transformer_width=512, transformer_layers=12),
    "ViT-L/14": dict(embed_dim=768, image_resolution=224, vision_layers=24, vision_width=1024, vision_patch_size=14,
                     context_length=77, vocab_size=49408, transformer_width=768, transformer_layers=12),
    "tiny": dict(embed_dim=32, image_resolution=32, vision_layers=2, vision_width=64, vision_patch_size=8,
                 context_length=77, vocab_size=49408, transformer_width=64, transformer_layers=2),
}


def random_model(config="tiny", seed=0):
    """A CLIP with random weights drawn as OpenAI's `initialize_parameters` draws them (for tests, benchmarks)."""
    config = CONFIGS[config] if isinstance(config, str) else config
    g = torch.Generator().manual_seed(seed)
    model = CLIP(**config)

    def normal_(t, std):
        with torch.no_grad():
            t.copy_(torch.randn(t.shape, generator=g) * std)

    for tower in (model.visual.transformer, model.transformer):
        width, layers = tower.resblocks[0].ln_1.normalized_shape[0], len(tower.resblocks)
        for block in tower.resblocks:
            normal_(block.attn.in_proj_weight, width ** -0.5)
            normal_(block.attn.out_proj.weight, width ** -0.5 * (2 * layers) ** -0.5)
            normal_(block.mlp.c_fc.weight, (2 * width) ** -0.5)
            normal_(block.mlp.c_proj.weight, width ** -0.5 * (2 * layers) ** -0.5)
            nn.init.zeros_(block.attn.in_proj_bias)  # as nn.MultiheadAttention initializes them
            nn.init.zeros_(block.attn.out_proj.bias)
            for linear in (block.mlp.c_fc, block.mlp.c_proj):  # nn.Linear's default bias init
                bound = linear.in_features ** -0.5
                with torch.no_grad():
                    linear.bias.copy_((torch.rand(linear.bias.shape, generator=g) * 2 - 1) * bound)
    v = model.visual
    width = v.class_embedding.shape[0]
    normal_(v.conv1.weight, (3 * v.conv1.kernel_size[0] ** 2) ** -0.5)
    for p in (v.class_embedding, v.positional_embedding, v.proj):
        normal_(p, width ** -0.5)
    normal_(model.token_embedding.weight, 0.02)
    normal_(model.positional_embedding, 0.01)
    normal_(model.text_projection, model.ln_final.normalized_shape[0] ** -0.5)
    nn.init.constant_(model.logit_scale, math.log(1 / 0.07))
    return model.eval()


# ----------------------------------------------------------------------------------------------------
# Tokenizer: OpenAI's byte-level BPE, in pure Python (no ftfy, no regex module)

VOCAB_FILE = Path(__file__).with_name("bpe_simple_vocab_16e6.txt.gz")
N_MERGES = 49152 - 256 - 2  # 48,894: 2 x 256 byte symbols + merges + 2 special tokens = 49,408 ids
SPECIAL_TOKENS = ("<|startoftext|>", "<|endoftext|>")
SOT, EOT = 49406, 49407
CONTRACTIONS = ("s", "t", "re", "ve", "m", "ll", "d")  # after an apostrophe, in OpenAI's pattern's order
# Unicode's White_Space characters: what OpenAI's `\s` (regex module) matches and collapses
WHITESPACE = "\t\n\x0b\x0c\r \x85\xa0\u1680\u2000\u2001\u2002\u2003\u2004\u2005\u2006\u2007\u2008\u2009\u200a" \
             "\u2028\u2029\u202f\u205f\u3000"
WHITESPACE_RUN = re.compile(f"[{WHITESPACE}]+")
# ftfy (which OpenAI runs first) straightens curly quotes; this is the one ftfy repair that well-formed text meets
STRAIGHT_QUOTES = str.maketrans({c: "'" for c in "\u02bc\u2018\u2019\u201a\u201b"}
                                | {c: '"' for c in "\u201c\u201d\u201e\u201f"})


def byte_symbols():
    """{byte: the character standing for it}: printable Latin-1 bytes stand for themselves, the other 68 for
    chr(256 + n) in byte order, so that BPE works on strings without whitespace or control characters."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    others = [b for b in range(256) if b not in printable]
    return {b: chr(b) for b in printable} | {b: chr(256 + n) for n, b in enumerate(others)}


BYTE_SYMBOLS = byte_symbols()


@functools.lru_cache(maxsize=None)
def vocabulary():
    """(token -> id, merge pair -> rank), in OpenAI's order: bytes, word-final bytes, merges, special tokens."""
    if not VOCAB_FILE.is_file():
        raise FileNotFoundError(f"{VOCAB_FILE}: CLIP's BPE vocabulary file is missing (it ships beside clip_min.py)")
    lines = gzip.decompress(VOCAB_FILE.read_bytes()).decode("utf-8").split("\n")
    merges = [tuple(line.split()) for line in lines[1:1 + N_MERGES]]  # line 0 is a version header
    symbols = list(BYTE_SYMBOLS.values())
    tokens = symbols + [s + "</w>" for s in symbols] + ["".join(m) for m in merges] + list(SPECIAL_TOKENS)
    return {t: i for i, t in enumerate(tokens)}, {m: r for r, m in enumerate(merges)}


def clean(text):
    """OpenAI's text cleaning: NFC + straight quotes (ftfy's part), html.unescape twice, whitespace, lowercase."""
    text = unicodedata.normalize("NFC", text).translate(STRAIGHT_QUOTES)
    text = html.unescape(html.unescape(text)).strip()
    return WHITESPACE_RUN.sub(" ", text).strip().lower()


def char_class(c):
    """'L' (letter), 'N' (number), ' ' (whitespace, skipped) or 'P' (anything else) by Unicode category."""
    if c in WHITESPACE:
        return " "
    if c == "\u0345":  # a combining mark that case-folds to a letter: OpenAI's case-insensitive classes skip it
        return " "
    category = unicodedata.category(c)[0]
    return category if category in "LN" else "P"


def pretokenize(text):
    """Split cleaned text as OpenAI's pattern does: special tokens, contractions, runs of letters, single
    number characters, runs of other non-space characters (whitespace separates and is dropped)."""
    i = 0
    while i < len(text):
        folded = text[i:i + 16].replace("ſ", "s")  # long s matches 's' in OpenAI's case-insensitive pattern
        special = next((t for t in SPECIAL_TOKENS if folded.startswith(t)), None)
        contraction = next((c for c in CONTRACTIONS if folded.startswith("'" + c)), None) if text[i] == "'" else None
        kind = char_class(text[i])
        if special or contraction:
            j = i + len(special or "'" + contraction)
        elif kind == " ":
            i += 1
            continue
        elif kind == "N":
            j = i + 1
        else:
            j = i + 1
            while j < len(text) and char_class(text[j]) == kind:
                j += 1
        yield text[i:j]
        i = j


@functools.lru_cache(maxsize=1 << 16)
def bpe(word):
    """Byte-pair merges of one pre-token (as byte symbols): merge the lowest-ranked adjacent pair everywhere,
    repeat until no adjacent pair is in the merge list. The last symbol is marked word-final with '</w>'."""
    if word in SPECIAL_TOKENS:
        return (word,)
    ranks = vocabulary()[1]
    parts = list(word[:-1]) + [word[-1] + "</w>"]
    while len(parts) > 1:
        pair = min(zip(parts, parts[1:]), key=lambda p: ranks.get(p, math.inf))
        if pair not in ranks:
            break
        merged, i = [], 0
        while i < len(parts):
            if i + 1 < len(parts) and (parts[i], parts[i + 1]) == pair:
                merged.append(parts[i] + parts[i + 1])
                i += 2
            else:
                merged.append(parts[i])
                i += 1
        parts = merged
    return tuple(parts)


def encode(text):
    """BPE token ids of `text` (without start/end tokens)."""
    ids = vocabulary()[0]
    return [ids[part]
            for word in pretokenize(clean(text))
            for part in bpe("".join(BYTE_SYMBOLS[b] for b in word.encode("utf-8")))]


def tokenize(texts, context_length=77, truncate=False):
    """(N, context_length) int32 token ids, [SOT, ..., EOT] zero-padded, as OpenAI's `clip.tokenize`.

    A text longer than the context raises RuntimeError, unless `truncate`: then it is cut and ends with EOT.
    """
    texts = [texts] if isinstance(texts, str) else list(texts)
    result = torch.zeros(len(texts), context_length, dtype=torch.int32)
    for i, text in enumerate(texts):
        ids = [SOT] + encode(text) + [EOT]
        if len(ids) > context_length:
            if not truncate:
                raise RuntimeError(f"text {i} ({text[:40]!r}...) has {len(ids)} tokens, more than the context length "
                                   f"{context_length}; pass truncate=True to cut it")
            ids = ids[:context_length - 1] + [EOT]
        result[i, :len(ids)] = torch.tensor(ids, dtype=torch.int32)
    return result


# ----------------------------------------------------------------------------------------------------
# Image preprocessing, as OpenAI's torchvision pipeline computes it (without torchvision)

MEAN = (0.48145466, 0.4578275, 0.40821073)  # CLIP's per-channel RGB mean and std
STD = (0.26862954, 0.26130258, 0.27577711)


def resize(image, size=224):
    """Shortest side to `size` with PIL bicubic; the long side truncated to an int, as torchvision's Resize(int)."""
    w, h = image.size
    short, long = min(w, h), max(w, h)
    new_long = int(size * long / short)
    new = (size, new_long) if w <= h else (new_long, size)
    return image if new == (w, h) else image.resize(new, Image.BICUBIC)


def center_crop(image, size=224):
    """The central size x size square; offsets rounded half to even, as torchvision's CenterCrop."""
    w, h = image.size
    if w < size or h < size:
        raise ValueError(f"center_crop: image {w}x{h} is smaller than the crop {size}x{size}")
    left, top = round((w - size) / 2), round((h - size) / 2)
    return image.crop((left, top, left + size, top + size))


def to_tensor(image):
    """A PIL image as a float32 (3, H, W) tensor in [0, 1]."""
    x = torch.from_numpy(np.array(image.convert("RGB"), dtype=np.uint8))  # (H, W, 3)
    return x.permute(2, 0, 1).float().div(255)  # (3, H, W)


def normalize(x):
    """(x - MEAN) / STD per channel, for (3, H, W) or (N, 3, H, W) images in [0, 1]."""
    if x.dim() not in (3, 4) or x.shape[-3] != 3:
        raise ValueError(f"normalize: expected images of shape (3, H, W) or (N, 3, H, W), got {tuple(x.shape)}")
    mean = torch.tensor(MEAN, dtype=x.dtype, device=x.device).view(3, 1, 1)
    std = torch.tensor(STD, dtype=x.dtype, device=x.device).view(3, 1, 1)
    return (x - mean) / std


def preprocess(image, n_px=224):
    """OpenAI's CLIP transform: resize, center crop, RGB, to tensor, normalize -> (3, n_px, n_px)."""
    return normalize(to_tensor(center_crop(resize(image, n_px), n_px).convert("RGB")))


# ----------------------------------------------------------------------------------------------------
# Loading OpenAI's checkpoints

# OpenAI's published ViT checkpoints; the path component before the file name is the file's SHA-256
MODELS = {
    "ViT-B/32": "https://openaipublic.azureedge.net/clip/models/"
                "40d365715913c9da98579312b702a82c18be219cc2a73407c4526f58eba950af/ViT-B-32.pt",
    "ViT-B/16": "https://openaipublic.azureedge.net/clip/models/"
                "5806e77cd80f8b59890b7e101eabd078d9fb84e6937f9e85e4ecb61988df416f/ViT-B-16.pt",
    "ViT-L/14": "https://openaipublic.azureedge.net/clip/models/"
                "b8cca3fd41ae0c99ba7e8951adf17d267cdb84cd88be6f7c2e0eca1737a03836/ViT-L-14.pt",
    "ViT-L/14@336px": "https://openaipublic.azureedge.net/clip/models/"
                      "3035c92b350959924f9f00213499208652fc7ea050643e8b385c2dac08641f02/ViT-L-14-336px.pt",
}
DOWNLOAD_ROOT = "~/.cache/clip"  # the folder OpenAI's package uses, so its downloads are reused


def available_models():
    return list(MODELS)


def checkpoint_path(name_or_path="ViT-B/16", download_root=None):
    """The file of a checkpoint: a name from MODELS (downloaded and verified if not cached) or a file path."""
    if name_or_path in MODELS:
        url = MODELS[name_or_path]
        root = Path(download_root or DOWNLOAD_ROOT).expanduser()
        try:
            return download(url, root / os.path.basename(url), sha256=url.split("/")[-2], what=name_or_path)
        except RuntimeError as e:
            raise RuntimeError(f"{e} (or pass --weights PATH to use a checkpoint file you have)") from None
    path = Path(name_or_path).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"no CLIP checkpoint {name_or_path!r}: not a file, nor one of {available_models()}")
    return path


def checkpoint(name_or_path="ViT-B/16", download_root=None):
    """(path, sha256) of a checkpoint, for run records: the SHA-256 is verified or computed, never assumed."""
    path = checkpoint_path(name_or_path, download_root)
    return path, (MODELS[name_or_path].split("/")[-2] if name_or_path in MODELS else file_sha256(path))


def load(name_or_path="ViT-B/16", device="cpu", download_root=None):
    """A CLIP in eval mode on `device`, in fp32, from a model name (see MODELS) or a checkpoint file."""
    path = checkpoint_path(name_or_path, download_root)
    return build_model(read_state_dict(path), source=str(path)).to(device)


# ----------------------------------------------------------------------------------------------------
# Reading OpenAI's TorchScript archive without executing it


def read_state_dict(path):
    """The tensors of a checkpoint file: OpenAI's TorchScript archive, or a `torch.save`d state dict.

    Nothing from the file is executed: archives go through a restricted unpickler (`ArchiveUnpickler`),
    plain files through `torch.load(weights_only=True)`.
    """
    path = Path(path)
    with open(path, "rb") as f:
        is_zip = f.read(4) == b"PK\x03\x04"
    if is_zip:
        try:
            with zipfile.ZipFile(path) as archive:
                top = archive_top(archive, path)
                if f"{top}/constants.pkl" in archive.namelist():  # only TorchScript archives carry code + constants
                    return read_torchscript(archive, top, path)
        except zipfile.BadZipFile as e:
            raise ValueError(f"{path}: truncated or corrupt checkpoint archive ({e})") from None
    try:
        state_dict = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise ValueError(f"{path}: not a CLIP checkpoint (neither a TorchScript archive nor a torch.save "
                         f"state dict that loads with weights_only=True): {e}") from None
    if not isinstance(state_dict, dict) or not all(isinstance(v, torch.Tensor) for v in state_dict.values()):
        raise ValueError(f"{path}: expected a dict of tensors (a state dict), got {type(state_dict).__name__}")
    return dict(state_dict)


def archive_top(archive, path):
    """The archive's top-level folder (named after the saved file, so never assumed), the one holding data.pkl."""
    tops = [name[:-len("/data.pkl")] for name in archive.namelist()
            if name.endswith("/data.pkl") and name.count("/") == 1]
    if len(tops) != 1:
        raise ValueError(f"{path}: not a PyTorch archive: expected one <folder>/data.pkl, found {len(tops)}")
    return tops[0]


def read_torchscript(archive, top, path):
    """{dotted name: tensor} of every tensor in the archive's module tree, rebuilt from its data/ records."""
    byteorder = f"{top}/byteorder"
    if byteorder in archive.namelist() and archive.read(byteorder).decode() != sys.byteorder:
        raise ValueError(f"{path}: archive byte order {archive.read(byteorder).decode()} is not this machine's")
    try:
        root = ArchiveUnpickler(archive, top, path).load()
    except (pickle.UnpicklingError, ValueError, KeyError, EOFError, RuntimeError, TypeError) as e:
        raise ValueError(f"{path}: cannot read the TorchScript archive's data.pkl: {e}") from None
    if not isinstance(root, ScriptObject):
        raise ValueError(f"{path}: data.pkl holds a {type(root).__name__}, not a TorchScript module")
    return dict(module_tensors(root))


class ScriptObject:
    """Stands for any `__torch__.*` class of an archive (OpenAI-internal module classes): just its attributes."""

    def __setstate__(self, state):
        if not isinstance(state, dict):
            raise pickle.UnpicklingError(f"TorchScript object with non-dict state {type(state).__name__}")
        self.__dict__.update(state)


def module_tensors(obj, prefix=""):
    """(dotted name, tensor) for every tensor attribute in the tree, as a state dict names them."""
    for name, value in vars(obj).items():
        if isinstance(value, torch.Tensor):
            yield prefix + name, value
        elif isinstance(value, ScriptObject):
            yield from module_tensors(value, prefix + name + ".")


# storage classes named in archives, and the dtype of their elements
STORAGE_DTYPES = {
    "HalfStorage": torch.float16, "FloatStorage": torch.float32, "DoubleStorage": torch.float64,
    "BFloat16Storage": torch.bfloat16, "LongStorage": torch.int64, "IntStorage": torch.int32,
    "ShortStorage": torch.int16, "CharStorage": torch.int8, "ByteStorage": torch.uint8, "BoolStorage": torch.bool,
}


def rebuild_tensor(storage, offset, size, stride, requires_grad=False, hooks=None, metadata=None):
    """What `torch._utils._rebuild_tensor_v2` means: a strided view of a flat storage."""
    return torch.as_strided(storage, size, stride, offset)


class ArchiveUnpickler(pickle.Unpickler):
    """Unpickles an archive's data.pkl allowing only tensors, storages, OrderedDicts and TorchScript objects.

    Any other global (os.system, builtins.eval, ...) is refused before it can be called.
    """

    def __init__(self, archive, top, path):
        super().__init__(io.BytesIO(archive.read(f"{top}/data.pkl")))
        self.archive, self.top, self.path, self.storages = archive, top, path, {}

    def find_class(self, module, name):
        if module == "__torch__" or module.startswith("__torch__."):
            return ScriptObject
        if (module, name) == ("torch._utils", "_rebuild_tensor_v2"):
            return rebuild_tensor
        if module == "torch" and name in STORAGE_DTYPES:
            return STORAGE_DTYPES[name]
        if (module, name) == ("collections", "OrderedDict"):
            return dict  # only used for the (empty) backward-hook dicts; order is irrelevant here
        raise pickle.UnpicklingError(f"refusing global '{module}.{name}' (a checkpoint holds only tensors)")

    def persistent_load(self, pid):
        # pid = ('storage', dtype, key, location, numel): the storage lives in the record <top>/data/<key>
        if not (isinstance(pid, tuple) and len(pid) == 5 and pid[0] == "storage" and isinstance(pid[1], torch.dtype)):
            raise pickle.UnpicklingError(f"unexpected persistent id {pid!r}")
        _, dtype, key, _, numel = pid
        if key not in self.storages:
            data = bytearray(self.archive.read(f"{self.top}/data/{key}"))
            if len(data) < numel * dtype.itemsize:
                raise ValueError(f"record data/{key} holds {len(data)} bytes, expected {numel * dtype.itemsize}")
            self.storages[key] = torch.frombuffer(data, dtype=dtype, count=numel) if numel else torch.empty(0, dtype=dtype)
        return self.storages[key]


# ----------------------------------------------------------------------------------------------------
# Downloads (shared with data.py)


def download(url, path, sha256=None, md5=None, what=None, size=None, retries=3, chunk=1 << 20):
    """Fetch `url` to `path`, verifying the checksum; return `path`.

    The bytes go to `<path>.part`, which is renamed onto `path` only once the checksum matches: a failure never
    leaves a file under the final name. A transfer broken mid-way resumes from the `.part` file with an HTTP Range
    request (up to `retries` times in this call; the next call resumes too); a server that ignores Range restarts
    from 0. A wrong checksum deletes the `.part` file. An existing file with the right checksum is reused, one with
    the wrong checksum is fetched again. `what` names the download in messages, `size` (bytes) is shown until the
    server says. Files get the usual mode (0o666 less the umask); folders this call created go if it fails.
    """
    path = Path(path).expanduser()
    if path.exists() and not path.is_file():
        raise RuntimeError(f"{path} exists and is not a regular file")
    if path.is_file():
        if checksum_ok(path, sha256, md5):
            return path
        print(f"{path}: checksum mismatch, downloading {url} again", file=sys.stderr)
    part = path.with_name(path.name + ".part")  # a stable name, so that the next call can resume from it
    created = make_dirs(path.parent)
    resumable = False
    try:
        for attempt in range(retries + 1):
            try:
                resumable |= _transfer(url, part, what or path.name, size, chunk, path)
                break
            except (OSError, http.client.HTTPException) as e:
                resumable |= getattr(e, "resumable", False)
                if isinstance(e, (_WriteFailed, urllib.error.HTTPError)) or attempt == retries:
                    raise  # the disk or the server said no (retrying cannot help), or the retries are spent
                done = part.stat().st_size if part.exists() else 0
                print(f"\n{what or path.name}: interrupted at {done / 2**20:.1f} MiB ({e}); "
                      f"{'resuming' if resumable else 'restarting'}", file=sys.stderr)
        if not checksum_ok(part, sha256, md5):
            part.unlink()
            raise RuntimeError("checksum mismatch (expected " + (f"sha256 {sha256})" if sha256 else f"md5 {md5})"))
        os.replace(part, path)
        fsync_dir(path.parent)
        return path
    except Exception as e:
        kept = part.exists() and part.stat().st_size > 0 and resumable and not isinstance(e, _WriteFailed)
        if not kept:
            part.unlink(missing_ok=True)
        remove_empty_dirs(created)
        hint = f"; rerun to resume from {part} ({part.stat().st_size / 2**20:.1f} MiB kept)" if kept else ""
        raise RuntimeError(f"download of {url} to {path} failed: {_reason(e, part)}{hint}") from e


class _WriteFailed(OSError):
    """Writing the downloaded bytes failed (a full disk, a read-only folder): retrying the network cannot help."""


def _transfer(url, part, what, size, chunk, path):
    """One HTTP request appending to `part` from its current size (a Range request); returns whether the server
    takes Range requests, i.e. whether a broken transfer can resume. A server that answers 200 to a Range request
    sends the whole file, which then overwrites `part` from 0.

    Raises OSError (with `.resumable`) when the connection breaks, _WriteFailed when the disk does.
    """
    offset = part.stat().st_size if part.exists() else 0
    request = urllib.request.Request(url, headers={"Range": f"bytes={offset}-"} if offset else {})
    try:
        response = urllib.request.urlopen(request, timeout=60)
    except urllib.error.HTTPError as e:
        if e.code == 416 and offset:  # nothing left to send: the .part file is complete (the checksum will tell)
            return True
        raise
    with response:
        ranged = response.status == 206 and _range_start(response) == offset
        resumable = ranged or response.headers.get("Accept-Ranges", "").lower() == "bytes"
        if offset and not ranged:
            print(f"{what}: the server ignores Range requests, restarting from 0", file=sys.stderr)
            offset = 0
        length = int(response.headers.get("Content-Length") or 0)
        total = offset + length if length else size or 0
        verb = f"resuming at {offset / 2**20:.1f} MiB" if offset else "downloading"
        print(f"{verb} {what} ({_mib(total) if total else 'size unknown'}) from {url} to {path}", file=sys.stderr)
        fd = os.open(part, os.O_WRONLY | os.O_CREAT | (os.O_APPEND if offset else os.O_TRUNC), 0o666)
        with os.fdopen(fd, "ab" if offset else "wb") as out:
            done, start, last = offset, time.monotonic(), 0.0
            try:
                while block := response.read(chunk):
                    _write(out, block)
                    done += len(block)
                    if time.monotonic() - last > 0.5 or done == total:
                        last = time.monotonic()
                        progress(what, done, total, last - start, offset)
            except (OSError, http.client.HTTPException) as e:
                if not isinstance(e, _WriteFailed):
                    e.resumable = resumable
                raise
            finally:
                print(file=sys.stderr)
            _write(out, sync=True)
        if total and done < total:
            error = OSError(f"connection closed after {done} of {total} bytes")
            error.resumable = resumable
            raise error
        return resumable


def _write(out, block=b"", sync=False):
    """out.write(block) (then fsync, with `sync`), turning a failure into _WriteFailed."""
    try:
        if block:
            out.write(block)
        if sync:
            out.flush()
            os.fsync(out.fileno())
    except OSError as e:
        raise _WriteFailed(e.errno, e.strerror or str(e)) from e


def _range_start(response):
    """The first byte a 206 response carries, from "Content-Range: bytes START-END/TOTAL"."""
    value = response.headers.get("Content-Range", "")
    try:
        return int(value.split()[1].split("-")[0])
    except (IndexError, ValueError):
        return None


def _reason(error, part):
    if isinstance(error, _WriteFailed) and error.errno == errno.ENOSPC:
        return f"no space left on device (ENOSPC) writing {part}: {error}"
    return str(error)


def _mib(n):
    return f"{n / 2**30:.1f} GiB" if n >= 2**30 else f"{n / 2**20:.1f} MiB"


def progress(what, done, total, seconds, start=0):
    """One `\r` line on stderr: share done, rate and time left (over the bytes of this call)."""
    rate = (done - start) / max(seconds, 1e-9)
    if total:
        left = (total - done) / rate if rate > 0 else float("inf")
        eta = f", ETA {int(left // 3600)}:{int(left % 3600 // 60):02d}:{int(left % 60):02d}" if left < 1e7 else ""
        share = f"{100 * done / total:5.1f}% of {_mib(total)}"
    else:
        share, eta = _mib(done), ""
    print(f"\r{what}: {share}, {rate / 2**20:.1f} MiB/s{eta}", end="", file=sys.stderr, flush=True)


def write_atomic(path, write):
    """write(tmp) to a fresh temporary file beside `path`, fsync it, then rename it onto `path` (used by data.py,
    train.py): readers see the old file or the new one, never half of one. The file gets the usual mode (0o666
    less the umask, as open() gives); a failed write leaves the previous file intact and no temporary behind."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.urandom(4).hex()}.tmp")
    try:
        os.close(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))  # the umask applies, unlike mkstemp's 0600
        write(tmp)
        fd = os.open(tmp, os.O_RDONLY)
        try:
            os.fsync(fd)  # the bytes are on disk before the rename makes them visible
        finally:
            os.close(fd)
        os.replace(tmp, path)
    except OSError as e:
        if e.errno == errno.ENOSPC:
            raise OSError(errno.ENOSPC, f"no space left on device (ENOSPC) writing {path}; "
                                        "the previous file is unchanged") from None
        raise
    finally:
        tmp.unlink(missing_ok=True)
    fsync_dir(path.parent)


def fsync_dir(folder):
    """Make a rename in `folder` durable, where the platform allows fsync on a folder."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def make_dirs(folder):
    """mkdir -p `folder`; returns the folders it created, deepest first (for remove_empty_dirs)."""
    folder, created = Path(folder), []
    while not folder.exists() and folder != folder.parent:
        created.append(folder)
        folder = folder.parent
    if created:
        created[0].mkdir(parents=True, exist_ok=True)
    return created


def remove_empty_dirs(folders):
    """Undo make_dirs where nothing was left inside: a failed call leaves no empty ~/data/eurosat behind."""
    for folder in folders:
        try:
            folder.rmdir()
        except OSError:
            return


def checksum_ok(path, sha256=None, md5=None):
    """True when the file's sha256 (or md5) matches; with no expected checksum, True."""
    if not (sha256 or md5):
        return True
    return file_hash(path, "sha256" if sha256 else "md5") == (sha256 or md5)


def file_sha256(path):
    return file_hash(path, "sha256")


def file_hash(path, algorithm="sha256"):
    h = hashlib.new(algorithm)
    with open(path, "rb") as f:
        while block := f.read(1 << 20):
            h.update(block)
    return h.hexdigest()
