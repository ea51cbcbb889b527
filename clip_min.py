"""A minimal CLIP (ViT image tower + causal text tower) that loads OpenAI's official checkpoints.

Parameter names and shapes are those of OpenAI's state dict, so a checkpoint loads with strict=True and
no renaming table, and `torch.func.functional_call(model, params, ...)` takes the same dict the
checkpoint holds. Every hyper-parameter is read off tensor shapes (see `config_from_state_dict`).

The API of OpenAI's `clip` package, without torchvision, ftfy or regex: `load(name_or_path)` reads OpenAI's
TorchScript archive without executing anything from it; `tokenize(texts)` is the same byte-level BPE;
`preprocess(pil_image)` is the same resize / crop / normalize. tests/test_clip_min.py checks each against
OpenAI's code.
"""

import functools
import gzip
import html
import math
import os
import re
from pathlib import Path

import numpy as np
import torch
from PIL import Image
import torch.nn.functional as F
from torch import nn

from toolbox.checkpoints import read_shapes, read_state_dict  # the reader that executes nothing; part of the API
from toolbox.downloads import download
from toolbox.files import file_sha256
from toolbox.open_clip import OPEN_CLIP_CONFIG, check_image_size  # open_clip_config.json; part of the API
from toolbox.open_clip import read_config as read_open_clip_config
from toolbox.unicode_text import category, fix_text  # what OpenAI gets from ftfy and `regex`


# ----------------------------------------------------------------------------------------------------
# The model


class LayerNorm(nn.LayerNorm):
    """LayerNorm computed in fp32 whatever the input dtype (as OpenAI's), cast back to the input dtype."""

    def forward(self, x):
        y = F.layer_norm(x.float(), self.normalized_shape, self.weight.float(), self.bias.float(), self.eps)
        return y.to(x.dtype)


def quick_gelu(x):
    """x * sigmoid(1.702 x): the GELU approximation OpenAI's CLIP was trained with."""
    return x * torch.sigmoid(1.702 * x)


def gelu(x):
    """x * Phi(x), Phi the standard normal CDF computed with erf (nn.GELU): the activation of most open_clip models."""
    return F.gelu(x)


# the MLP's activation, by the name open_clip's configs use (OpenAI's checkpoints: quick_gelu)
ACTIVATIONS = {"quick_gelu": quick_gelu, "gelu": gelu}


def _check_activation(activation):
    if activation not in ACTIVATIONS:
        raise ValueError(f"activation {activation!r}: expected one of {', '.join(ACTIVATIONS)}")
    return activation


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
        # unbind, not qkv[..., 0, :, :] and so on: the backward of each index would fill a zero tensor the size of
        # qkv; unbind over dim 2 before the transpose, so that its backward (a stack) writes the (N, L, 3, H, D/H)
        # gradient in qkv's own layout, with no copy to make it contiguous
        heads = qkv.view(n, length, 3, self.heads, width // self.heads).unbind(2)  # 3 x (N, L, H, D/H)
        q, k, v = (t.transpose(1, 2) for t in heads)  # (N, H, L, D/H)
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask)  # (N, H, L, D/H)
        y = y.transpose(1, 2).reshape(n, length, width)  # (N, L, D)
        return self.out_proj(y)


class MLP(nn.Module):
    """c_proj(activation(c_fc(x))): the block's feed-forward network, where OrthCR's rotations go."""

    recompute_activation = True  # the speed and memory device below; False runs the plain formula

    def __init__(self, width, activation="quick_gelu"):
        super().__init__()
        self.activation = _check_activation(activation)
        self.c_fc = nn.Linear(width, 4 * width)
        self.c_proj = nn.Linear(4 * width, width)

    def forward(self, x):
        if not self.recompute_activation:
            return self.c_proj(ACTIVATIONS[self.activation](self.c_fc(x)))  # the plain formula
        # the same, keeping only c_fc's output for the backward (speed section: _mlp_recompute)
        return _mlp_recompute(x, self.c_fc.weight, self.c_fc.bias, self.c_proj.weight, self.c_proj.bias,
                              self.activation)


class ResidualAttentionBlock(nn.Module):
    """Pre-LN transformer block: x + attn(ln_1(x)), then x + mlp(ln_2(x))."""

    def __init__(self, width, heads, activation="quick_gelu"):
        super().__init__()
        self.attn = Attention(width, heads)
        self.ln_1 = LayerNorm(width)
        self.mlp = MLP(width, activation)
        self.ln_2 = LayerNorm(width)

    def forward(self, x, attn_mask=None):
        x = x + self.attn(self.ln_1(x), attn_mask)
        return x + self.mlp(self.ln_2(x))


class Transformer(nn.Module):
    def __init__(self, width, layers, heads, activation="quick_gelu"):
        super().__init__()
        self.resblocks = nn.ModuleList([ResidualAttentionBlock(width, heads, activation) for _ in range(layers)])

    def forward(self, x, attn_mask=None):
        for block in self.resblocks:
            x = block(x, attn_mask)
        return x


class VisionTransformer(nn.Module):
    def __init__(self, input_resolution, patch_size, width, layers, heads, output_dim, activation="quick_gelu"):
        super().__init__()
        self.input_resolution = input_resolution
        self.conv1 = nn.Conv2d(3, width, kernel_size=patch_size, stride=patch_size, bias=False)
        self.class_embedding = nn.Parameter(torch.empty(width))
        self.positional_embedding = nn.Parameter(torch.empty((input_resolution // patch_size) ** 2 + 1, width))
        self.ln_pre = LayerNorm(width)
        self.transformer = Transformer(width, layers, heads, activation)
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
                 context_length, vocab_size, transformer_width, transformer_layers, activation="quick_gelu"):
        super().__init__()
        self.context_length = context_length
        # not in the checkpoint: OpenAI's weights use quick_gelu, most of open_clip's gelu (a key of ACTIVATIONS)
        self.activation = _check_activation(activation)
        # the head count is not in the checkpoint either: OpenAI's code uses width // 64 in both towers
        self.visual = VisionTransformer(image_resolution, vision_patch_size, vision_width, vision_layers,
                                        vision_width // 64, embed_dim, activation)
        self.transformer = Transformer(transformer_width, transformer_layers, transformer_width // 64, activation)
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


# Each activation as f(s h) / s, for an elementwise f with a fused aten backward: quick_gelu(h) = silu(1.702 h) / 1.702
# (x sigmoid(1.702 x) = silu(1.702 x) / 1.702), gelu(h) = gelu(h). The scale s is folded into the weights
# (s c_fc(x) = x (s W)^T + s b, c_proj(f / s) = f (W / s)^T + b): a pass over a weight instead of two over the
# (tokens, 4 * width) activation; the results differ from the plain formula by float rounding only.
_SCALED_ACTIVATIONS = {
    "quick_gelu": (1.702, F.silu, torch.ops.aten.silu_backward),
    "gelu": (1.0, F.gelu, torch.ops.aten.gelu_backward),
}


def _mlp_recompute(x, fc_weight, fc_bias, proj_weight, proj_bias, activation):
    """MLP.forward's plain formula c_proj(activation(c_fc(x))) with the activation's scale folded into the weights
    and the activation recomputed in the backward (_ActivationLinear)."""
    s, _, _ = _SCALED_ACTIVATIONS[activation]
    if s != 1.0:
        fc_weight, fc_bias, proj_weight = fc_weight * s, fc_bias * s, proj_weight / s
    return _ActivationLinear.apply(F.linear(x, fc_weight, fc_bias), proj_weight, proj_bias, activation)


class _ActivationLinear(torch.autograd.Function):
    """F.linear(f(h), weight, bias), f the activation's elementwise function, keeping only h for the backward
    and recomputing f(h) there.

    Plain autograd would keep two (tokens, 4 * width) tensors per block (the activation's input and c_proj's
    input); recomputing the cheap element-wise activation halves that, the largest share of training memory."""

    @staticmethod
    @torch.amp.custom_fwd(device_type="cuda")
    def forward(ctx, h, weight, bias, activation):
        ctx.activation = activation
        ctx.save_for_backward(h, weight)
        return F.linear(_SCALED_ACTIVATIONS[activation][1](h), weight, bias)

    @staticmethod
    @torch.amp.custom_bwd(device_type="cuda")
    def backward(ctx, grad):
        h, weight = ctx.saved_tensors
        _, f, f_backward = _SCALED_ACTIVATIONS[ctx.activation]
        grad_h = grad_weight = grad_bias = None
        if ctx.needs_input_grad[2]:
            grad_bias = grad.flatten(0, -2).sum(0)
        if ctx.needs_input_grad[1]:  # the linear's input f(h), recomputed
            grad_weight = grad.flatten(0, -2).t() @ f(h).flatten(0, -2)  # (out, 4 * width)
        if ctx.needs_input_grad[0]:  # f'(h) * upstream: aten's fused backward of f
            grad_h = f_backward(grad @ weight.to(grad.dtype), h)
        return grad_h, grad_weight, grad_bias, None


# ----------------------------------------------------------------------------------------------------
# Building a model from a state dict

# non-parameter tensors in OpenAI's TorchScript archives, dropped by OpenAI's own loader too
ARCHIVE_EXTRAS = ("input_resolution", "context_length", "vocab_size")
# buffers some open_clip checkpoints carry: the text tower's causal mask (the model builds its own)
OPEN_CLIP_EXTRAS = ("attn_mask",)


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


def build_model(state_dict, source="state dict", activation="quick_gelu"):
    """A CLIP in eval mode holding exactly the tensors of `state_dict` (official keys), in fp32.

    `activation` (a key of ACTIVATIONS) is not in the tensors: OpenAI's checkpoints use quick_gelu, most of
    open_clip's gelu.

    Missing, extra or misshapen tensors raise one ValueError naming `source` and every problem.
    """
    _check_activation(activation)
    state_dict = {k: v for k, v in state_dict.items() if k not in ARCHIVE_EXTRAS + OPEN_CLIP_EXTRAS}
    _check_tokenizer(state_dict, source)
    try:
        config = config_from_state_dict(state_dict)
    except KeyError as e:
        raise ValueError(f"{source}: not a CLIP checkpoint, missing tensor {e}") from None
    except (AttributeError, IndexError, TypeError) as e:
        raise ValueError(f"{source}: not a CLIP checkpoint ({e})") from None
    except ValueError as e:
        raise ValueError(f"{source}: {e}") from None
    with torch.device("meta"):
        model = CLIP(**config, activation=activation)
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


def _check_tokenizer(state_dict, source):
    """One line for an open_clip checkpoint whose text tower reads another tokenizer's ids than CLIP's BPE
    (clip_min's only). (A vocabulary of another size alone says nothing: the tests' tiny archive has 300 tokens.)"""
    if "logit_bias" in state_dict:
        raise ValueError(f"{source}: a SigLIP model (it has a logit_bias), with its own tokenizer: clip_min has "
                         f"CLIP's BPE tokenizer only")
    if any(k.startswith("text.") for k in state_dict):
        raise ValueError(f"{source}: a custom text tower (keys 'text.*', open_clip's CustomTextCLIP), with its own "
                         f"tokenizer: clip_min has CLIP's BPE tokenizer only")


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


def random_model(config="tiny", seed=0, activation="quick_gelu"):
    """A CLIP with random weights drawn as OpenAI's `initialize_parameters` draws them (for tests, benchmarks)."""
    config = CONFIGS[config] if isinstance(config, str) else config
    g = torch.Generator().manual_seed(seed)
    model = CLIP(**config, activation=activation)

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
# the cleaning (`fix_text`, toolbox/unicode_text.py, is ftfy's part), `_pretokenize` the split, `_bpe` the merges.

VOCAB_FILE = Path(__file__).with_name("bpe_simple_vocab_16e6.txt.gz")
_N_MERGES = 49152 - 256 - 2  # 48,894: 2 x 256 byte symbols + merges + 2 special tokens = 49,408 ids
SPECIAL_TOKENS = ("<|startoftext|>", "<|endoftext|>")
SOT, EOT = 49406, 49407

# --- OpenAI's pattern, by Unicode category: <|startoftext|>|<|endoftext|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|
# [^\s\p{L}\p{N}]+, case-insensitive

_CONTRACTIONS = ("s", "t", "re", "ve", "m", "ll", "d")  # after an apostrophe, in OpenAI's pattern's order
# Unicode's White_Space characters: what OpenAI's `\s` (regex module) matches and collapses
_WHITESPACE = "\t\n\x0b\x0c\r \x85\xa0\u1680\u2000\u2001\u2002\u2003\u2004\u2005\u2006\u2007\u2008\u2009\u200a" \
              "\u2028\u2029\u202f\u205f\u3000"
_WHITESPACE_RUN = re.compile(f"[{_WHITESPACE}]+")


def _char_class(c):
    """'L' (letter), 'N' (number), ' ' (whitespace, skipped) or 'P' (anything else) by Unicode category."""
    if c in _WHITESPACE:
        return " "
    if c == "\u0345":  # a combining mark that case-folds to a letter: OpenAI's case-insensitive classes skip it
        return " "
    kind = category(c)  # Unicode's, with the letters and numbers newer than this Python's unicodedata
    return kind if kind in "LN" else "P"


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
    """OpenAI's text cleaning: ftfy's fixes (`fix_text`), html.unescape twice, strip, whitespace runs to one
    space, lower case."""
    text = html.unescape(html.unescape(fix_text(text))).strip()
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


# An r:1 image resized to a short side of n_px holds n_px^2 * r pixels: 1 x 100,000 pixels (a 476-byte PNG) would
# take 15 GB at 224 px. Such an image is refused rather than resized in bounded memory: the center crop would keep
# a sliver of it, so no prediction on it means anything, and a crop-first resize would no longer be OpenAI's
# pipeline. 100:1 keeps the resized image under 34 MB at 336 px; photos, panoramas included, stay far below.
MAX_ASPECT_RATIO = 100


def resize(image, size=224):
    """Shortest side to `size` with PIL bicubic; the long side truncated to an int, as torchvision's Resize(int)."""
    w, h = image.size
    short, long = min(w, h), max(w, h)
    if not short or long > MAX_ASPECT_RATIO * short:
        raise ValueError(f"resize: a {w}x{h} image is longer than {MAX_ASPECT_RATIO}:1, which CLIP's preprocessing "
                         "cannot resize in bounded memory")
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


def normalize(x, mean=MEAN, std=STD):
    """(x - mean) / std per channel, for (3, H, W) or (N, 3, H, W) images in [0, 1]; CLIP's constants unless a
    checkpoint has others (model.mean, model.std of `load`; see checkpoint_settings)."""
    if x.dim() not in (3, 4) or x.shape[-3] != 3:
        raise ValueError(f"normalize: expected images of shape (3, H, W) or (N, 3, H, W), got {tuple(x.shape)}")
    mean = torch.tensor(mean, dtype=x.dtype, device=x.device).view(3, 1, 1)
    std = torch.tensor(std, dtype=x.dtype, device=x.device).view(3, 1, 1)
    return (x - mean) / std


def preprocess(image, n_px=224, mean=MEAN, std=STD):
    """OpenAI's CLIP transform: resize, center crop, RGB, to tensor, normalize -> (3, n_px, n_px)."""
    return normalize(to_tensor(center_crop(resize(image, n_px), n_px).convert("RGB")), mean, std)


# ----------------------------------------------------------------------------------------------------
# Loading checkpoints: OpenAI's, and open_clip's ViTs (their config read by toolbox/open_clip.py)

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


def checkpoint_settings(path, activation=None):
    """What a model needs beyond the tensors of the checkpoint at `path`: {"activation": a key of ACTIVATIONS,
    "mean": (r, g, b), "std": (r, g, b), "image_size": int or None}.

    From open_clip_config.json beside the file when it is there (`activation`, if given, must agree with it; a
    model that clip_min doesn't compute is refused: toolbox/open_clip.py); otherwise `activation` (default
    quick_gelu, OpenAI's) and CLIP's MEAN and STD."""
    if activation is not None:
        _check_activation(activation)
    settings = read_open_clip_config(path, activation, MEAN, STD)
    return settings or dict(activation=activation or "quick_gelu", mean=MEAN, std=STD, image_size=None)


def load(name_or_path="ViT-B/16", device="cpu", download_root=None, activation=None):
    """A CLIP in eval mode on `device`, in fp32, from a model name (see MODELS) or a checkpoint file: OpenAI's
    TorchScript archive, a torch.save state dict or a safetensors file (open_clip's ViT checkpoints).

    What the tensors don't tell comes from checkpoint_settings (open_clip_config.json beside the file, else
    `activation`); the model carries the normalization constants its images need as `model.mean`, `model.std`
    (give them to `preprocess` / `normalize`)."""
    path = checkpoint_path(name_or_path, download_root)
    settings = checkpoint_settings(path, activation)
    model = build_model(read_state_dict(path), source=str(path), activation=settings["activation"])
    check_image_size(model, settings, path)  # a config's image size against the tensors'
    model.mean, model.std = settings["mean"], settings["std"]
    return model.to(device)
