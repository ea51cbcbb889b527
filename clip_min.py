"""A minimal CLIP (ViT image tower + causal text tower) that loads OpenAI's official checkpoints.

Parameter names and shapes are those of OpenAI's state dict, so a checkpoint loads with strict=True and
no renaming table, and `torch.func.functional_call(model, params, ...)` takes the same dict the
checkpoint holds. Every hyper-parameter is read off tensor shapes (see `config_from_state_dict`).

The API of OpenAI's `clip` package, without torchvision, ftfy or regex: `load(name_or_path)` reads OpenAI's
TorchScript archive without executing anything from it; `tokenize(texts)` is the same byte-level BPE;
`preprocess(pil_image)` is the same resize / crop / normalize. tests/test_clip_min.py checks each against
OpenAI's code.
"""

import bisect
import errno
import functools
import gzip
import hashlib
import html
import html.entities
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
    """c_proj(quick_gelu(c_fc(x))): the block's feed-forward network, where OrthCR's rotations go."""

    recompute_activation = True  # the memory device below; False runs the plain formula

    def __init__(self, width):
        super().__init__()
        self.c_fc = nn.Linear(width, 4 * width)
        self.c_proj = nn.Linear(4 * width, width)

    def forward(self, x):
        if not self.recompute_activation:
            return self.c_proj(quick_gelu(self.c_fc(x)))  # the plain formula
        # the same, keeping only c_fc's output for the backward (speed section: _QuickGELULinear)
        return _QuickGELULinear.apply(self.c_fc(x), self.c_proj.weight, self.c_proj.bias)


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

    def forward(self, x, dense=False):
        """Class-token features (N, E); with `dense`, also every patch token through ln_post and proj
        (N, grid*grid, E), the standard dense CLIP features (OrthSR's attentive Cutout reads them)."""
        x = self.conv1(x.to(self.conv1.weight.dtype))  # (N, D, grid, grid)
        # the residual stream stays in the parameters' dtype: fp32 under autocast (only the matmuls are cast),
        # fp16 in a model cast to fp16 as OpenAI ships it
        x = x.flatten(2).transpose(1, 2).to(self.class_embedding.dtype)  # (N, grid*grid, D)
        cls = self.class_embedding.expand(x.shape[0], 1, -1)  # (N, 1, D)
        x = torch.cat([cls, x], dim=1) + self.positional_embedding  # (N, 1+grid*grid, D)
        x = self.transformer(self.ln_pre(x))
        if not dense:
            return self.ln_post(x[:, 0, :]) @ self.proj  # class token -> (N, E)
        x = self.ln_post(x) @ self.proj  # (N, 1+grid*grid, E); LayerNorm is per token, so the class token is as above
        return x[:, 0], x[:, 1:]


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

    def encode_image(self, image, dense=False):
        return self.visual(image, dense)

    def encode_text(self, text, embeddings=None):
        """Features (N, E) of token ids `text` (N, L); `embeddings` (N, L, D), when given, replace the looked-up
        token embeddings (CoOp's learned context) while the ids still locate the end-of-text token."""
        # a context shorter than 77 is allowed: causal attention means tokens after the end-of-text token
        # never reach its features, so callers may trim padding for speed
        x = self.token_embedding(text) if embeddings is None else embeddings  # (N, L, D)
        x = x + self.positional_embedding[:text.shape[1]].to(x.dtype)
        # additive causal mask: -inf above the diagonal, so token i attends to tokens 0..i only
        mask = torch.full((x.shape[1], x.shape[1]), float("-inf"), dtype=x.dtype, device=x.device).triu(1)
        x = self.transformer(x, mask)
        x = self.ln_final(x)
        # the end-of-text token has the largest id in the vocabulary, so argmax finds it
        x = x[torch.arange(x.shape[0], device=x.device), text.argmax(dim=-1)]  # (N, D)
        return x @ self.text_projection

    def forward(self, image=None, text=None, dense=False, embeddings=None):
        """(logits_per_image, logits_per_text) as OpenAI's; with only one input, that tower's features
        (so `torch.func.functional_call(model, params, ...)` can run either tower alone)."""
        if text is None:
            return self.encode_image(image, dense)
        if image is None:
            return self.encode_text(text, embeddings)
        image_features = F.normalize(self.encode_image(image), dim=-1)
        text_features = F.normalize(self.encode_text(text), dim=-1)
        logits_per_image = self.logit_scale.exp() * image_features @ text_features.t()
        return logits_per_image, logits_per_image.t()


# ----------------------------------------------------------------------------------------------------
# Speed devices of the model (MLP.forward's plain formula is beside its call; tests check they agree)


class _QuickGELULinear(torch.autograd.Function):
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
    bad = next((k for k, v in state_dict.items() if v.is_floating_point() and not torch.isfinite(v).all()), None)
    if bad is not None:  # a NaN weight would surface as a NaN loss at step 1, far from its cause
        raise ValueError(f"{source}: tensor {bad} holds non-finite values")
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
    "ViT-L/14@336px": dict(embed_dim=768, image_resolution=336, vision_layers=24, vision_width=1024,
                           vision_patch_size=14, context_length=77, vocab_size=49408, transformer_width=768,
                           transformer_layers=12),
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
#
# OpenAI's SimpleTokenizer cleans a text (ftfy.fix_text, html.unescape twice, whitespace runs to one space,
# lower case), splits it with a `regex` pattern, and BPE-merges the UTF-8 bytes of each piece. Here `clean` is
# the cleaning (`_fix_text` is ftfy's part), `_pretokenize` the split, `_bpe` the merges.

VOCAB_FILE = Path(__file__).with_name("bpe_simple_vocab_16e6.txt.gz")
_N_MERGES = 49152 - 256 - 2  # 48,894: 2 x 256 byte symbols + merges + 2 special tokens = 49,408 ids
SPECIAL_TOKENS = ("<|startoftext|>", "<|endoftext|>")
SOT, EOT = 49406, 49407

# --- ftfy's fix_text, as OpenAI runs it (ftfy 6.3.1, default TextFixerConfig), without its mojibake repair.
# The facts below (which characters each fix rewrites, the order of the fixes) are read from ftfy 6.3.1's
# fixes.py, chardata.py and __init__.py; the tables are built here from unicodedata and Python's codecs.
# In ftfy's order:

# unescape_html: only references ending in ';' ("this&not that" stays)...
_HTML_ENTITY = re.compile(r"&#?[0-9A-Za-z]{1,24};")
# ...and the all-caps spelling of a lower-case HTML5 name where html.unescape reads none of it ('&EACUTE;' -> 'É';
# not '&COPYSR;', which html.unescape reads as '©SR;')
_CAPS_ENTITIES = {f"&{name.upper()}": char.upper() for name, char in html.entities.html5.items()
                  if name.endswith(";") and name.islower() and html.unescape(f"&{name.upper()}") == f"&{name.upper()}"}
# fix_c1_controls: U+0080-U+009F read as Windows-1252 bytes ('\x93' -> '“'); the five bytes Windows-1252 leaves
# undefined (81 8D 8F 90 9D) stay, as in ftfy's "sloppy" codec
_C1_CONTROLS = {b: bytes([b]).decode("cp1252", errors="ignore") or chr(b) for b in range(0x80, 0xA0)}
# fix_latin_ligatures: these 22 Latin ligatures and digraphs become their letters (one level of their Unicode
# compatibility decomposition: 'ﬅ' -> 'ſt', not NFKC's 'st'); 'æ', 'œ' and non-Latin ligatures stay
_LIGATURES = str.maketrans({c: "".join(chr(int(h, 16)) for h in unicodedata.decomposition(c).split()[1:])
                            for c in "ĲĳŉǄǅǆǇǈǉǊǋǌǱǲǳﬀﬁﬂﬃﬄﬅﬆ"})
# fix_character_width: the full- and half-width forms block (U+FF01-U+FFEF) to its NFKC form, and the
# ideographic space to a space
_WIDTH = {0x3000: " "} | {c: unicodedata.normalize("NFKC", chr(c)) for c in range(0xFF01, 0xFFF0)
                          if unicodedata.normalize("NFKC", chr(c)) != chr(c)}
# uncurl_quotes
_STRAIGHT_QUOTES = dict.fromkeys([0x02BC, *range(0x2018, 0x201C)], "'") | dict.fromkeys(range(0x201C, 0x2020), '"')
# fix_line_breaks: CR LF (replaced first), CR, line and paragraph separators, NEL to LF
_LINE_BREAKS = dict.fromkeys(map(ord, "\r\u2028\u2029\x85"), "\n")
# fix_surrogates
_SURROGATE_PAIR, _SURROGATE = re.compile("[\ud800-\udbff][\udc00-\udfff]"), re.compile("[\ud800-\udfff]")
# remove_terminal_escapes: ANSI "ESC [ digits/semicolons letter" (\d: any Unicode digit, as in ftfy's `re`)
_TERMINAL_ESCAPE = re.compile(r"\x1b\[[\d;]*[a-zA-Z]")
# remove_control_chars: C0 controls but \t \n \f \r, DEL, deprecated Arabic format controls, BOM, interlinear
# annotation marks, object replacement (not C1 controls, joiners, bidi marks, tags)
_CONTROL_CHARS = dict.fromkeys([*range(0x00, 0x09), 0x0B, *range(0x0E, 0x20), 0x7F, *range(0x206A, 0x2070),
                                0xFEFF, *range(0xFFF9, 0xFFFD)])
_FTFY_SEGMENT = 1_000_000  # ftfy fixes a text line by line, lines cut to segments of at most this many characters


def _chained(*tables):
    """One str.translate table that does `tables` one after another."""
    table = {}
    for c in set().union(*tables):
        table[c] = chr(c)
        for t in tables:
            table[c] = table[c].translate(t)
    return table


_FIX_CHARACTERS = _chained(_C1_CONTROLS, _LIGATURES, _WIDTH, _STRAIGHT_QUOTES, _LINE_BREAKS)


def _unescape_entity(match):
    """An HTML reference ftfy decodes: one that html.unescape reads whole (';' included), or an all-caps name."""
    entity = match.group()
    decoded = html.unescape(entity)
    return decoded if ";" not in decoded else _CAPS_ENTITIES.get(entity, entity)


def _fix_surrogates(text):
    """UTF-16 surrogate pairs to the character they encode, lone surrogates to U+FFFD (a str may hold them)."""
    text = _SURROGATE_PAIR.sub(lambda m: m.group().encode("utf-16-le", "surrogatepass").decode("utf-16-le"), text)
    return _SURROGATE.sub("\ufffd", text)


def _fix_segment(text, unescape):
    """ftfy's fixes on one segment, in its order, repeated until the text stops changing (as ftfy does)."""
    while True:
        before = text
        if unescape:
            text = _HTML_ENTITY.sub(_unescape_entity, text)
        # CR LF first: no character fix makes or takes a CR or LF, so this is ftfy's order too
        text = _fix_surrogates(text.replace("\r\n", "\n").translate(_FIX_CHARACTERS))
        text = _TERMINAL_ESCAPE.sub("", text).translate(_CONTROL_CHARS)
        text = unicodedata.normalize("NFC", text)
        if text == before:
            return text


def _fix_text(text):
    """ftfy.fix_text without mojibake repair: segment by segment (lines, cut every _FTFY_SEGMENT characters).
    HTML references are decoded only before the first segment holding a '<' (ftfy takes that text for HTML)."""
    unescape, fixed = True, []
    for line in re.findall(r"[^\n]*\n|[^\n]+", text):
        for start in range(0, len(line), _FTFY_SEGMENT):
            segment = line[start:start + _FTFY_SEGMENT]
            unescape = unescape and "<" not in segment
            fixed.append(_fix_segment(segment, unescape))
    return "".join(fixed)


# --- OpenAI's pattern, by Unicode category: <|startoftext|>|<|endoftext|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|
# [^\s\p{L}\p{N}]+, case-insensitive

_CONTRACTIONS = ("s", "t", "re", "ve", "m", "ll", "d")  # after an apostrophe, in OpenAI's pattern's order
# Unicode's White_Space characters: what OpenAI's `\s` (regex module) matches and collapses
_WHITESPACE = "\t\n\x0b\x0c\r \x85\xa0\u1680\u2000\u2001\u2002\u2003\u2004\u2005\u2006\u2007\u2008\u2009\u200a" \
              "\u2028\u2029\u202f\u205f\u3000"
_WHITESPACE_RUN = re.compile(f"[{_WHITESPACE}]+")
# Letters (L) and numbers (N) in the regex module 2026.11.19's Unicode data that Python 3.11's unicodedata
# (Unicode 14.0) doesn't know yet: (first, last, class), sorted; used only for characters unicodedata calls 'Cn'
_NEWER_LETTERS_AND_NUMBERS = (
    (0x558, 0x558, "L"), (0x58B, 0x58C, "L"), (0x88F, 0x88F, "L"), (0xC5C, 0xC5C, "L"), (0xCDC, 0xCDC, "L"),
    (0x1C89, 0x1C8A, "L"), (0x208F, 0x208F, "L"), (0x209D, 0x209F, "L"), (0xA7CB, 0xA7CF, "L"), (0xA7D2, 0xA7D2, "L"),
    (0xA7D4, 0xA7D4, "L"), (0xA7DA, 0xA7DD, "L"), (0xA7E2, 0xA7E2, "L"), (0xA7F1, 0xA7F1, "L"), (0xAB6C, 0xAB6D, "L"),
    (0x105C0, 0x105F3, "L"), (0x107BB, 0x107BF, "L"), (0x10940, 0x10959, "L"), (0x10D40, 0x10D49, "N"),
    (0x10D4A, 0x10D65, "L"), (0x10D6F, 0x10D85, "L"), (0x10EC2, 0x10EC7, "L"), (0x10ED9, 0x10EEE, "L"),
    (0x1123F, 0x11240, "L"), (0x11380, 0x11389, "L"), (0x1138B, 0x1138B, "L"), (0x1138E, 0x1138E, "L"),
    (0x11390, 0x113B5, "L"), (0x113B7, 0x113B7, "L"), (0x113D1, 0x113D1, "L"), (0x113D3, 0x113D3, "L"),
    (0x116D0, 0x116E3, "N"), (0x11B0A, 0x11B0A, "L"), (0x11BC0, 0x11BE0, "L"), (0x11BF0, 0x11BF9, "N"),
    (0x11DB0, 0x11DDB, "L"), (0x11DE0, 0x11DE9, "N"), (0x11DF1, 0x11DF1, "L"), (0x11F02, 0x11F02, "L"),
    (0x11F04, 0x11F10, "L"), (0x11F12, 0x11F33, "L"), (0x11F50, 0x11F59, "N"), (0x1246F, 0x1246F, "N"),
    (0x12475, 0x1247F, "N"), (0x12550, 0x12686, "N"), (0x1342F, 0x1342F, "L"), (0x13441, 0x13446, "L"),
    (0x13460, 0x143FA, "L"), (0x16100, 0x1611D, "L"), (0x16130, 0x16139, "N"), (0x16D40, 0x16D6C, "L"),
    (0x16D70, 0x16D79, "N"), (0x16EA0, 0x16EB8, "L"), (0x16EBB, 0x16ED3, "L"), (0x16FF2, 0x16FF3, "L"),
    (0x16FF4, 0x16FF6, "N"), (0x187F8, 0x187FF, "L"), (0x18CD6, 0x18CDA, "L"), (0x18CFF, 0x18CFF, "L"),
    (0x18D09, 0x18D20, "L"), (0x18D80, 0x18DF2, "L"), (0x18E00, 0x19191, "L"), (0x191A0, 0x191D2, "L"),
    (0x1B123, 0x1B128, "L"), (0x1B132, 0x1B132, "L"), (0x1B155, 0x1B155, "L"), (0x1B168, 0x1B168, "L"),
    (0x1CCF0, 0x1CCF9, "N"), (0x1D2C0, 0x1D2D3, "N"), (0x1D6A6, 0x1D6A6, "L"), (0x1DF1F, 0x1DF81, "L"),
    (0x1DF90, 0x1DF96, "L"), (0x1DFCD, 0x1DFFF, "L"), (0x1E030, 0x1E06D, "L"), (0x1E4D0, 0x1E4EB, "L"),
    (0x1E4F0, 0x1E4F9, "N"), (0x1E5D0, 0x1E5ED, "L"), (0x1E5F0, 0x1E5F0, "L"), (0x1E5F1, 0x1E5FA, "N"),
    (0x1E6C0, 0x1E6DE, "L"), (0x1E6E0, 0x1E6E2, "L"), (0x1E6E4, 0x1E6E5, "L"), (0x1E6E7, 0x1E6ED, "L"),
    (0x1E6F0, 0x1E6F4, "L"), (0x1E6FE, 0x1E6FF, "L"), (0x2B739, 0x2B73F, "L"), (0x2B81E, 0x2B81E, "L"),
    (0x2CEA2, 0x2CEAD, "L"), (0x2EBF0, 0x2EE5D, "L"), (0x31350, 0x33479, "L"), (0x3D000, 0x3FC3F, "L"),
)


def _category(c):
    """The major class of c's Unicode general category ('L', 'N', 'P', ...); for a character this Python's
    unicodedata doesn't know ('Cn'), the class the newer table gives it."""
    category = unicodedata.category(c)
    if category == "Cn":
        i = bisect.bisect_right(_NEWER_LETTERS_AND_NUMBERS, (ord(c), math.inf))  # the last range starting <= c
        if i and ord(c) <= _NEWER_LETTERS_AND_NUMBERS[i - 1][1]:
            return _NEWER_LETTERS_AND_NUMBERS[i - 1][2]
    return category[0]


def _char_class(c):
    """'L' (letter), 'N' (number), ' ' (whitespace, skipped) or 'P' (anything else) by Unicode category."""
    if c in _WHITESPACE:
        return " "
    if c == "\u0345":  # a combining mark that case-folds to a letter: OpenAI's case-insensitive classes skip it
        return " "
    category = _category(c)
    return category if category in "LN" else "P"


def _pretokenize(text):
    """Split cleaned text as OpenAI's pattern does: special tokens, contractions, runs of letters, single
    number characters, runs of other non-space characters (whitespace separates and is dropped)."""
    i = 0
    while i < len(text):
        folded = text[i:i + 16].replace("ſ", "s")  # long s matches 's' in OpenAI's case-insensitive pattern
        special = next((t for t in SPECIAL_TOKENS if folded.startswith(t)), None)
        contraction = next((c for c in _CONTRACTIONS if folded.startswith("'" + c)), None) if text[i] == "'" else None
        kind = _char_class(text[i])
        if special or contraction:
            j = i + len(special or "'" + contraction)
        elif kind == " ":
            i += 1
            continue
        elif kind == "N":
            j = i + 1
        else:
            j = i + 1
            while j < len(text) and _char_class(text[j]) == kind:
                j += 1
        yield text[i:j]
        i = j


# --- byte-pair encoding

def _byte_symbols():
    """{byte: the character standing for it}: printable Latin-1 bytes stand for themselves, the other 68 for
    chr(256 + n) in byte order, so that BPE works on strings without whitespace or control characters."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    others = [b for b in range(256) if b not in printable]
    return {b: chr(b) for b in printable} | {b: chr(256 + n) for n, b in enumerate(others)}


_BYTE_SYMBOLS = _byte_symbols()


@functools.lru_cache(maxsize=None)
def vocabulary():
    """(token -> id, merge pair -> rank), in OpenAI's order: bytes, word-final bytes, merges, special tokens."""
    if not VOCAB_FILE.is_file():
        raise FileNotFoundError(f"{VOCAB_FILE}: CLIP's BPE vocabulary file is missing (it ships beside clip_min.py)")
    lines = gzip.decompress(VOCAB_FILE.read_bytes()).decode("utf-8").split("\n")
    merges = [tuple(line.split()) for line in lines[1:1 + _N_MERGES]]  # line 0 is a version header
    symbols = list(_BYTE_SYMBOLS.values())
    tokens = symbols + [s + "</w>" for s in symbols] + ["".join(m) for m in merges] + list(SPECIAL_TOKENS)
    return {t: i for i, t in enumerate(tokens)}, {m: r for r, m in enumerate(merges)}


@functools.lru_cache(maxsize=1 << 16)
def _bpe(word):
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


# --- the API

def clean(text):
    """OpenAI's text cleaning: ftfy's fixes (`_fix_text`), html.unescape twice, strip, whitespace runs to one
    space, lower case."""
    text = html.unescape(html.unescape(_fix_text(text))).strip()
    return _WHITESPACE_RUN.sub(" ", text).strip().lower()


def encode(text):
    """BPE token ids of `text` (without start/end tokens)."""
    ids = vocabulary()[0]
    return [ids[part]
            for word in _pretokenize(clean(text))
            for part in _bpe("".join(_BYTE_SYMBOLS[b] for b in word.encode("utf-8")))]


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
# Reading checkpoints (OpenAI's TorchScript archives, torch.save files) without executing them
#
# A checkpoint is untrusted input: nothing in it is executed, and it can't make the reader allocate more than
# the file's own size. PyTorch stores the pickle and tensor records of its zip archives uncompressed (so that
# they can be memory-mapped): such a record can't inflate, and each storage record must hold exactly numel x
# itemsize bytes. (TorchScript's code/ records are compressed; they are never read.)

# storage classes named in archives, and the dtype of their elements
_STORAGE_DTYPES = {
    "HalfStorage": torch.float16, "FloatStorage": torch.float32, "DoubleStorage": torch.float64,
    "BFloat16Storage": torch.bfloat16, "LongStorage": torch.int64, "IntStorage": torch.int32,
    "ShortStorage": torch.int16, "CharStorage": torch.int8, "ByteStorage": torch.uint8, "BoolStorage": torch.bool,
}
_MAX_NESTING = 100  # modules within modules; CLIP's deepest tensor is 5 deep (visual.transformer.resblocks.0.attn)
_CHUNK = 1 << 20  # bytes read at a time into a storage


def read_state_dict(path):
    """The tensors of a checkpoint file: OpenAI's TorchScript archive, or a `torch.save`d state dict.

    Nothing from the file is executed: archives go through a restricted unpickler (`_ArchiveUnpickler`),
    plain files through `torch.load(weights_only=True)`. Records are size-checked before anything is allocated
    and read once, into the tensors' own memory. A file that is not a sound checkpoint raises one ValueError
    naming it (a missing one FileNotFoundError).
    """
    return _read_checkpoint(Path(path), data=True)


def read_shapes(path):
    """{name: torch.Size} of a checkpoint's tensors without reading their data, with read_state_dict's checks
    (to check a model's layout before loading it). Only a legacy torch.save file (not a zip) is read whole."""
    return {name: tensor.shape for name, tensor in _read_checkpoint(Path(path), data=False).items()}


def check_torch_file(path, blob=None):
    """Raise one ValueError naming `path` unless it is a torch.save zip archive whose records are stored
    uncompressed within the file: then torch.load(weights_only=True) allocates at most the file's size. With
    `blob`, the file's bytes already read are checked (so that what is checked is what gets loaded)."""
    path = Path(path)
    if blob is None:
        with open(path, "rb") as f:
            head = f.read(4)
    else:
        head = blob[:4]
    if head != b"PK\x03\x04":
        raise ValueError(f"{path}: not a torch.save zip archive")
    with _open_archive(path if blob is None else io.BytesIO(blob), path) as archive:
        _archive_top(archive, path)
        _check_records(archive.infolist(), path, None if blob is None else len(blob))


def _read_checkpoint(path, data):
    """{name: tensor} of a checkpoint; without `data`, tensors with the right shapes and dtypes whose bytes are
    never read (meta tensors from archives, memory-mapped ones from torch.load)."""
    if path.is_dir():
        raise ValueError(f"{path}: a directory, not a checkpoint file")
    with open(path, "rb") as f:
        head = f.read(4)
    if not head:
        raise ValueError(f"{path}: empty file, not a checkpoint")
    is_zip = head == b"PK\x03\x04"
    if is_zip:
        with _open_archive(path) as archive:
            top = _archive_top(archive, path)
            if f"{top}/constants.pkl" in archive.NameToInfo:  # only TorchScript archives carry constants
                _check_records([info for info in archive.infolist() if info.filename in (
                    f"{top}/data.pkl", f"{top}/byteorder") or info.filename.startswith(f"{top}/data/")], path)
                return _checked(_read_torchscript(archive, top, path, data), path)
            _check_records(archive.infolist(), path)  # before torch.load reads any of them
    try:
        # a zip (records checked above) can be memory-mapped: its tensors' bytes are then never read
        state_dict = torch.load(path, map_location="cpu", weights_only=True, mmap=is_zip and not data)
    except Exception as e:
        raise ValueError(f"{path}: not a CLIP checkpoint (neither a TorchScript archive nor a torch.save "
                         f"state dict that loads with weights_only=True): {_reason(e)}") from None
    return _checked(state_dict, path)


def _reason(error):
    """One line saying why `error` happened. (torch.load's weights-only message opens with advice to switch the
    check off; its reason is the next line.)"""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    if len(lines) > 1 and lines[0].startswith("Weights only load failed"):
        lines = lines[1:]
    return f"{type(error).__name__}: {lines[0][:300]}" if lines else type(error).__name__


def _checked(state_dict, path):
    """The state dict as a plain dict, if it is a dict of tensors none of which overlaps itself (a view with
    stride 0 would let a small file make a huge tensor)."""
    if not isinstance(state_dict, dict) or not all(isinstance(v, torch.Tensor) for v in state_dict.values()):
        raise ValueError(f"{path}: expected a dict of tensors (a state dict), got {type(state_dict).__name__}")
    for name, tensor in state_dict.items():
        if tensor.numel() * tensor.element_size() > tensor.untyped_storage().nbytes():
            raise ValueError(f"{path}: tensor {name} of shape {tuple(tensor.shape)} overlaps itself: more "
                             f"elements than its storage holds")
    return dict(state_dict)


def _open_archive(path, name=None):
    """The zip archive at `path` (or in a file object, `name` naming it), its directory read."""
    try:
        return zipfile.ZipFile(path)
    except Exception as e:  # BadZipFile, NotImplementedError, UnicodeDecodeError...: zipfile's ways to fail
        raise ValueError(f"{name or path}: truncated or corrupt checkpoint archive ({_reason(e)})") from None


def _archive_top(archive, path):
    """The archive's top-level folder (named after the saved file, so never assumed), the one holding data.pkl."""
    tops = [name[:-len("/data.pkl")] for name in archive.namelist()
            if name.endswith("/data.pkl") and name.count("/") == 1]
    if len(tops) != 1:
        raise ValueError(f"{path}: not a PyTorch archive: expected one <folder>/data.pkl, found {len(tops)}")
    return tops[0]


def _check_records(records, path, size=None):
    """Each record stored uncompressed and inside the file, and all together no bigger than the file (zip
    entries may point at the same bytes): then reading them takes at most the file's size."""
    size, total = path.stat().st_size if size is None else size, 0
    for info in records:
        if info.compress_type != zipfile.ZIP_STORED or info.compress_size != info.file_size:
            raise ValueError(f"{path}: record {info.filename!r} is compressed ({info.compress_size} bytes declared "
                             f"to inflate to {info.file_size}); PyTorch stores tensor records uncompressed")
        if info.header_offset + info.file_size > size:
            raise ValueError(f"{path}: record {info.filename!r} declares {info.file_size} bytes, past the end of "
                             f"the {size}-byte file")
        total += info.file_size
    if total > size:
        raise ValueError(f"{path}: the records declare {total} bytes in all, more than the file's {size}")


def _read_torchscript(archive, top, path, data):
    """{dotted name: tensor} of every tensor in the archive's module tree, rebuilt from its data/ records."""
    byteorder = archive.NameToInfo.get(f"{top}/byteorder")  # older archives have none: they are little-endian
    order = b"little"
    if byteorder is not None:  # its first 16 bytes at most: 'little' or 'big'
        order = _read_record(archive, byteorder, bytearray(min(byteorder.file_size, 16)), path)
    if order != sys.byteorder.encode():
        raise ValueError(f"{path}: archive byte order {bytes(order)!r} is not this machine's ({sys.byteorder})")
    try:
        with archive.open(f"{top}/data.pkl") as pickled:  # unpickled as it is read
            unpickler = _ArchiveUnpickler(pickled, archive, top, data)
            root = unpickler.load()
        if not isinstance(root, _ScriptObject):
            raise ValueError(f"data.pkl holds a {type(root).__name__}, not a TorchScript module")
        tensors = dict(_module_tensors(root))
    except Exception as e:  # whatever the pickle makes the unpickler raise
        raise ValueError(f"{path}: cannot read the TorchScript archive's data.pkl: {_reason(e)}") from None
    for info, storage in unpickler.unread:
        _read_record(archive, info, memoryview(storage.view(torch.uint8).numpy()), path)
    return tensors


def _read_record(archive, info, buffer, path):
    """`buffer` filled with the first len(buffer) bytes of record `info`, read a chunk at a time: no second
    copy of the record."""
    view = memoryview(buffer)
    try:
        with archive.open(info) as record:
            for start in range(0, len(view), _CHUNK):
                end = min(start + _CHUNK, len(view))
                if record.readinto(view[start:end]) != end - start:
                    raise EOFError(f"{info.file_size}-byte record ends early")
    except Exception as e:  # a damaged local header, a CRC mismatch, a short file...
        raise ValueError(f"{path}: record {info.filename!r} is corrupt ({_reason(e)})") from None
    return buffer


class _ScriptObject:
    """Stands for any `__torch__.*` class of an archive (OpenAI-internal module classes): just its attributes."""

    def __setstate__(self, state):
        if not isinstance(state, dict):
            raise pickle.UnpicklingError(f"TorchScript object with non-dict state {type(state).__name__}")
        self.__dict__.update(state)


def _module_tensors(obj, prefix="", ancestors=()):
    """(dotted name, tensor) for every tensor attribute in the tree, as a state dict names them; a module that
    holds itself, or nesting deeper than _MAX_NESTING, is an error (not a RecursionError)."""
    if len(ancestors) == _MAX_NESTING:
        raise ValueError(f"modules nested deeper than {_MAX_NESTING} (at {prefix[:80]}...)")
    for name, value in vars(obj).items():
        if isinstance(value, torch.Tensor):
            yield prefix + str(name), value
        elif isinstance(value, _ScriptObject):
            if value is obj or any(value is a for a in ancestors):
                raise ValueError(f"module {(prefix + str(name))[:80]!r} contains itself")
            yield from _module_tensors(value, f"{prefix}{name}.", ancestors + (obj,))


def _rebuild_tensor(storage, offset, size, stride, requires_grad=False, hooks=None, metadata=None):
    """What `torch._utils._rebuild_tensor_v2` means: a strided view of a flat storage, which must lie inside it
    (checked here: on the meta device torch doesn't)."""
    if not all(isinstance(n, int) and n >= 0 for n in (offset, *size, *stride)) or len(size) != len(stride):
        raise ValueError("a tensor with a malformed offset, size or stride")
    end = offset + sum((n - 1) * s for n, s in zip(size, stride)) + 1 if math.prod(size) else 0
    if end > storage.numel():
        raise ValueError(f"tensor of size {tuple(size)} at offset {offset} reaches past its storage of "
                         f"{storage.numel()} elements")
    return torch.as_strided(storage, size, stride, offset)


class _ArchiveUnpickler(pickle.Unpickler):
    """Unpickles an archive's data.pkl allowing only tensors, storages, OrderedDicts and TorchScript objects.

    Any other global (os.system, builtins.eval, ...) is refused before it can be called. Each storage is
    allocated once its record is found to hold exactly numel x itemsize bytes, and left empty: `unread` lists
    (record, storage) pairs to fill (with data=False storages are meta tensors and nothing is to be read).
    """

    def __init__(self, pickled, archive, top, data):
        super().__init__(pickled)
        self.archive, self.top, self.data = archive, top, data
        self.storages, self.unread = {}, []

    def find_class(self, module, name):
        if module == "__torch__" or module.startswith("__torch__."):
            return _ScriptObject
        if (module, name) == ("torch._utils", "_rebuild_tensor_v2"):
            return _rebuild_tensor
        if module == "torch" and name in _STORAGE_DTYPES:
            return _STORAGE_DTYPES[name]
        if (module, name) == ("collections", "OrderedDict"):
            return dict  # only used for the (empty) backward-hook dicts; order is irrelevant here
        raise pickle.UnpicklingError(f"refusing global '{module}.{name}' (a checkpoint holds only tensors)")

    def persistent_load(self, pid):
        # pid = ('storage', dtype, key, location, numel): the storage lives in the record <top>/data/<key>
        if not (isinstance(pid, tuple) and len(pid) == 5 and pid[0] == "storage" and isinstance(pid[1], torch.dtype)
                and isinstance(pid[2], str) and pid[2].isalnum() and isinstance(pid[4], int) and pid[4] >= 0):
            raise pickle.UnpicklingError(f"unexpected persistent id (a {type(pid).__name__})")
        _, dtype, key, _, numel = pid
        if key not in self.storages:
            info = self.archive.NameToInfo.get(f"{self.top}/data/{key}")
            if info is None:
                raise ValueError(f"no record data/{key}")
            if info.file_size != numel * dtype.itemsize:  # before allocating or reading anything
                raise ValueError(f"record data/{key} holds {info.file_size} bytes, its storage of {numel} {dtype} "
                                 f"takes {numel * dtype.itemsize}")
            self.storages[key] = torch.empty(numel, dtype=dtype, device="cpu" if self.data else "meta")
            if self.data:
                self.unread.append((info, self.storages[key]))
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
        if _checksum_ok(path, sha256, md5):
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
        if not _checksum_ok(part, sha256, md5):
            part.unlink()
            raise RuntimeError("checksum mismatch (expected " + (f"sha256 {sha256})" if sha256 else f"md5 {md5})"))
        os.replace(part, path)
        _fsync_dir(path.parent)
        return path
    except Exception as e:
        kept = part.exists() and part.stat().st_size > 0 and resumable and not isinstance(e, _WriteFailed)
        if not kept:
            part.unlink(missing_ok=True)
        remove_empty_dirs(created)
        hint = f"; rerun to resume from {part} ({part.stat().st_size / 2**20:.1f} MiB kept)" if kept else ""
        raise RuntimeError(f"download of {url} to {path} failed: {_download_failure(e, part)}{hint}") from e


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
                        _progress(what, done, total, last - start, offset)
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


def _download_failure(error, part):
    if isinstance(error, _WriteFailed) and error.errno == errno.ENOSPC:
        return f"no space left on device (ENOSPC) writing {part}: {error}"
    return str(error)


def _mib(n):
    return f"{n / 2**30:.1f} GiB" if n >= 2**30 else f"{n / 2**20:.1f} MiB"


def _progress(what, done, total, seconds, start=0):
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
    _fsync_dir(path.parent)


def _fsync_dir(folder):
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


def _checksum_ok(path, sha256=None, md5=None):
    """True when the file's sha256 (or md5) matches; with no expected checksum, True."""
    if not (sha256 or md5):
        return True
    return _file_hash(path, "sha256" if sha256 else "md5") == (sha256 or md5)


def file_sha256(path):
    return _file_hash(path, "sha256")


def _file_hash(path, algorithm="sha256"):
    h = hashlib.new(algorithm)
    with open(path, "rb") as f:
        while block := f.read(1 << 20):
            h.update(block)
    return h.hexdigest()
