"""A minimal CLIP (ViT image tower + causal text tower) that loads OpenAI's official checkpoints.

Parameter names and shapes are those of OpenAI's state dict, so a checkpoint loads with strict=True and
no renaming table, and `torch.func.functional_call(model, params, ...)` takes the same dict the
checkpoint holds. Every hyper-parameter is read off tensor shapes (see `config_from_state_dict`).
"""

import hashlib
import math
import os
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

# ----------------------------------------------------------------------------------------------------
# The model


class LayerNorm(nn.LayerNorm):
    """LayerNorm computed in fp32 whatever the input dtype (as OpenAI's), cast back to the input dtype."""

    def forward(self, x):
        y = F.layer_norm(x.float(), self.normalized_shape, self.weight.float(), self.bias.float(), self.eps)
        return y.to(x.dtype)


class QuickGELU(nn.Module):
    """x * sigmoid(1.702 x): the GELU approximation CLIP was trained with."""

    def forward(self, x):
        return x * torch.sigmoid(1.702 * x)


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
        qkv = qkv.view(n, length, 3, self.heads, width // self.heads).permute(2, 0, 3, 1, 4)  # (3, N, H, L, D/H)
        y = F.scaled_dot_product_attention(qkv[0], qkv[1], qkv[2], attn_mask=attn_mask)  # (N, H, L, D/H)
        y = y.transpose(1, 2).reshape(n, length, width)  # (N, L, D)
        return self.out_proj(y)


class MLP(nn.Module):
    def __init__(self, width):
        super().__init__()
        self.c_fc = nn.Linear(width, 4 * width)
        self.gelu = QuickGELU()
        self.c_proj = nn.Linear(4 * width, width)

    def forward(self, x):
        return self.c_proj(self.gelu(self.c_fc(x)))


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
        x = self.token_embedding(text) + self.positional_embedding.to(self.dtype)  # (N, L, D)
        # additive causal mask: -inf above the diagonal, so token i attends to tokens 0..i only
        mask = torch.full((x.shape[1], x.shape[1]), float("-inf"), dtype=x.dtype, device=x.device).triu(1)
        x = self.transformer(x, mask)
        x = self.ln_final(x)
        # the end-of-text token has the largest id in the vocabulary, so argmax finds it
        x = x[torch.arange(x.shape[0], device=x.device), text.argmax(dim=-1)]  # (N, D)
        return x @ self.text_projection

    def forward(self, image, text):
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
# Downloads (shared with data.py)


def download(url, path, sha256=None, md5=None, chunk=1 << 20):
    """Fetch `url` to `path`, verifying the checksum; return `path`.

    Streams to a temporary file beside `path` with a progress line on stderr and renames it into place
    only once the checksum matches, so a failure never leaves a file under the final name. An existing
    file with the right checksum is reused; one with the wrong checksum is downloaded again.
    """
    path = Path(path).expanduser()
    if path.exists() and not path.is_file():
        raise RuntimeError(f"{path} exists and is not a regular file")
    if path.is_file():
        if checksum_ok(path, sha256, md5):
            return path
        print(f"{path}: checksum mismatch, downloading {url} again", file=sys.stderr)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".part")
    try:
        with os.fdopen(fd, "wb") as out:
            try:
                with urllib.request.urlopen(url, timeout=60) as response:
                    total = int(response.headers.get("Content-Length") or 0)
                    done, start, last = 0, time.monotonic(), 0.0
                    while block := response.read(chunk):
                        out.write(block)
                        done += len(block)
                        if time.monotonic() - last > 0.5 or done == total:
                            last = time.monotonic()
                            progress(url, done, total, last - start)
                    if total and done != total:
                        raise OSError(f"connection closed after {done} of {total} bytes")
            except Exception as e:  # network faults, HTTP errors, short reads, full disks
                raise RuntimeError(f"download of {url} to {path} failed: {e}") from e
            finally:
                print(file=sys.stderr)
        if not checksum_ok(tmp, sha256, md5):
            raise RuntimeError(f"download of {url} to {path} failed: checksum mismatch "
                               f"(expected {'sha256 ' + sha256 if sha256 else 'md5 ' + md5})")
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    return path


def progress(url, done, total, seconds):
    rate = done / max(seconds, 1e-9) / 2**20
    share = f"{100 * done / total:5.1f}% of {total / 2**20:.1f} MiB" if total else f"{done / 2**20:.1f} MiB"
    print(f"\r{os.path.basename(url)}: {share}, {rate:.1f} MiB/s", end="", file=sys.stderr, flush=True)


def checksum_ok(path, sha256=None, md5=None):
    """True when the file's sha256 (or md5) matches; with no expected checksum, True."""
    if not (sha256 or md5):
        return True
    h = hashlib.sha256() if sha256 else hashlib.md5()
    with open(path, "rb") as f:
        while block := f.read(1 << 20):
            h.update(block)
    return h.hexdigest() == (sha256 or md5)
