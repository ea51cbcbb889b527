"""open_clip's checkpoints (open_clip_pytorch_model.bin, open_clip_model.safetensors): what its config says beyond
the tensors, and whether clip_min computes the model it describes.

open_clip's ViT CLIPs use OpenAI's parameter names; what differs (the activation, the normalization constants) is
in open_clip_config.json, which open_clip's published folders ship beside the weights: {"model_cfg": <open_clip's
model config>, "preprocess_cfg": {"mean", "std", ...}}. Models that clip_min doesn't compute are refused by name.
`clip_min.checkpoint_settings` reads the config through `read_config`; `clip_min.check_image_size` is this
module's `check_image_size`.
"""

import json
import math
from pathlib import Path

from toolbox import files

OPEN_CLIP_CONFIG = "open_clip_config.json"
# model_cfg entries (open_clip 3.3's CLIPVisionCfg / CLIPTextCfg fields) that change the computation, and the
# value clip_min computes; a config giving another value is refused
_VISION = dict(head_width=64, mlp_ratio=4.0, ls_init_value=None, attentional_pool=False, no_ln_pre=False,
               pos_embed_type="learnable", final_ln_after_pool=False, pool_type="tok", act_kwargs=None,
               norm_kwargs=None, qk_norm=False, scaled_cosine_attn=False, scale_heads=False, scale_attn_inner=False,
               scale_attn=False, scale_fc=False, timm_model_name=None)
_TEXT = dict(mlp_ratio=4.0, ls_init_value=None, embed_cls=False, no_causal_mask=False, final_ln_after_pool=False,
             pool_type="argmax", proj_bias=False, proj_type="linear", act_kwargs=None, norm_kwargs=None,
             qk_norm=False, scaled_cosine_attn=False, scale_heads=False, scale_attn_inner=False, scale_attn=False,
             scale_fc=False)
# text_cfg entries that mean another tokenizer than CLIP's BPE (SigLIP's, a Hugging Face model's, ...)
_TOKENIZER = dict(hf_model_name=None, hf_tokenizer_name=None, tokenizer_mode=None, tokenizer_kwargs=None,
                  vocab_size=49408)
_PREPROCESS = dict(interpolation="bicubic", resize_mode="shortest", mode="RGB")


def config_path(path):
    """Where open_clip's config of the checkpoint file `path` is: beside it."""
    return Path(path).parent / OPEN_CLIP_CONFIG


def read_config(path, activation, mean, std):
    """{"activation", "mean", "std", "image_size"} of the checkpoint at `path` from the open_clip_config.json
    beside it, or None when there is none. `activation`, if not None, must agree with the config; `mean` and
    `std` are the constants of a config that gives none (CLIP's, as open_clip's default).

    A config describing a model that clip_min doesn't compute (another tokenizer, SigLIP, CoCa, a timm or ResNet
    tower, wider heads, ...) raises one ValueError naming the config and the entry."""
    path = config_path(path)
    if not path.is_file():
        return None
    try:  # a key given twice: JSON readers keep either value, so the file says two things
        config = json.loads(files.read_bounded(path, 2**20, "open_clip config"), object_pairs_hook=_unique_keys)
        model_cfg, preprocess_cfg = config.get("model_cfg", {}), config.get("preprocess_cfg", {})  # a real one: ~1 KB
        vision, text = model_cfg.get("vision_cfg", {}), model_cfg.get("text_cfg", {})
        if not all(isinstance(d, dict) for d in (model_cfg, preprocess_cfg, vision, text)):
            raise ValueError("model_cfg, its vision_cfg and text_cfg, and preprocess_cfg must be objects")
    except _RepeatedKey as e:
        raise ValueError(f"{path}: the key {e.args[0]!r} is given twice in one object (JSON readers keep either "
                         f"value): give it once") from None
    except (OSError, UnicodeDecodeError, ValueError, AttributeError, RecursionError) as e:  # Recursion: deep nesting
        raise ValueError(f"{path}: not an open_clip config ({e})") from None

    def refuse(what):
        raise ValueError(f"{path}: {what}, which clip_min's CLIP does not compute")

    for key, expected in _TOKENIZER.items():
        if text.get(key, expected) != expected:
            refuse(f"another tokenizer (text_cfg {key} {_shown(text[key], form=repr)}; clip_min has CLIP's BPE "
                   f"tokenizer only)")
    if "init_logit_bias" in model_cfg:
        refuse("a SigLIP model (init_logit_bias: a sigmoid loss and its own tokenizer)")
    for key in ("custom_text", "multimodal_cfg"):
        if model_cfg.get(key):
            refuse(f"another architecture (model_cfg {key} {_shown(model_cfg[key], form=repr)})")
    if not isinstance(vision.get("layers", 12), int):
        refuse("a ResNet image tower (vision_cfg layers is a list)")
    for tower, fields, values in (("vision_cfg", _VISION, vision), ("text_cfg", _TEXT, text)):
        for key, expected in fields.items():
            if values.get(key, expected) != expected and not (key == "act_kwargs" and values[key] == {}):
                refuse(f"{tower} {key} {_shown(values[key], form=repr)} (clip_min computes {expected!r})")
    width = text.get("width", 512)
    if type(width) is not int or width < 1:  # it gives the text tower's heads
        raise ValueError(f"{path}: text_cfg width must be a whole number > 0, got {_shown(width)}")
    if text.get("heads", width // 64) != width // 64:
        refuse(f"text_cfg heads {_shown(text['heads'], form=repr)} (clip_min's text tower has width // 64 heads, "
               f"as OpenAI's)")
    for key, expected in _PREPROCESS.items():
        if preprocess_cfg.get(key, expected) != expected:
            refuse(f"preprocess_cfg {key} {_shown(preprocess_cfg[key], form=repr)} (clip_min preprocesses as OpenAI: "
                   f"{expected!r})")
    mean, std = preprocess_cfg.get("mean", mean), preprocess_cfg.get("std", std)
    for key, value in (("mean", mean), ("std", std)):  # checked before the activation: the file's own fault first
        if not (isinstance(value, (list, tuple)) and len(value) == 3
                and all(_finite(v) and (key == "mean" or v > 0) for v in value)):
            raise ValueError(f"{path}: preprocess_cfg {key} must be three finite numbers, one per RGB channel"
                             f"{', each > 0 (it divides)' if key == 'std' else ''}; got {_shown(value)}")
    quick_gelu = model_cfg.get("quick_gelu", False)
    if type(quick_gelu) is not bool:
        raise ValueError(f"{path}: model_cfg quick_gelu must be true or false, got {_shown(quick_gelu)}")
    configured = "quick_gelu" if quick_gelu else "gelu"
    if activation is not None and activation != configured:
        raise ValueError(f"{path}: says the model uses {configured}, not the {activation} asked for")
    image_size = vision.get("image_size")
    if image_size is not None and type(image_size) is not int:
        refuse(f"a non-square image size (vision_cfg image_size {_shown(image_size, form=repr)})")
    return dict(activation=configured, mean=tuple(map(float, mean)), std=tuple(map(float, std)),
                image_size=image_size)


def _shown(value, limit=60, form=json.dumps):
    """A config's value as JSON (or as `form` writes it), cut to `limit` characters ('...' where it is cut): a
    value in a refusal is one short part of one line, whatever its size in the file."""
    text = form(value)
    return text if len(text) <= limit else text[:limit - 3] + "..."


def _finite(v):
    """A JSON number that is a finite float (an integer too large for a float is not: math.isfinite would raise)."""
    try:
        return type(v) in (int, float) and math.isfinite(v)
    except OverflowError:
        return False


class _RepeatedKey(ValueError):
    pass


def _unique_keys(pairs):
    """json.loads's object_pairs_hook: an object, refused when it names a key twice."""
    seen = set()
    for key, _ in pairs:
        if key in seen:
            raise _RepeatedKey(key)
        seen.add(key)
    return dict(pairs)


def check_image_size(model, settings, path):
    """The image size the tensors give (patch size x grid) against the one the config states, if any."""
    if settings["image_size"] not in (None, model.visual.input_resolution):
        raise ValueError(f"{config_path(path)}: says {settings['image_size']} px images, the tensors of {path} are "
                         f"for {model.visual.input_resolution} px")
