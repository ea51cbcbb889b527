"""Random open_clip models and their features, made by open_clip's own code, for tests/test_checkpoints.py.

Run in a subprocess (`python open_clip_reference.py OPEN_CLIP_DIR OUT MODEL...`): open_clip's package imports
torchvision, which this project's torch doesn't have, so its model code is imported without the package's
__init__ (and torchvision.ops.misc, used only to freeze ResNets' batch norms, is stubbed). For each model name
(a config in open_clip's model_configs/) it writes to OUT/<name>/ what an open_clip folder holds:
open_clip_pytorch_model.bin (torch.save of the state dict), open_clip_model.safetensors (where the safetensors
package is installed) and open_clip_config.json; and reference.pt, the inputs and open_clip's fp32 features.
"""

import json
import sys
import types
from pathlib import Path

import torch


def import_open_clip_model(folder):
    """open_clip.model from `folder` (holding open_clip/), without running open_clip/__init__.py."""
    package = types.ModuleType("open_clip")
    package.__path__ = [str(Path(folder) / "open_clip")]
    misc = types.ModuleType("torchvision.ops.misc")
    misc.FrozenBatchNorm2d = type("FrozenBatchNorm2d", (torch.nn.Module,), {})  # never used by ViT models
    sys.modules.update({"open_clip": package, "torchvision": types.ModuleType("torchvision"),
                        "torchvision.ops": types.ModuleType("torchvision.ops"), "torchvision.ops.misc": misc})
    import open_clip.constants
    import open_clip.model
    return open_clip.model, open_clip.constants


def reference(folder, out, name, seed=0):
    model_module, constants = sys.modules["open_clip.model"], sys.modules["open_clip.constants"]
    config = json.loads((Path(folder) / "open_clip" / "model_configs" / f"{name}.json").read_text())
    torch.manual_seed(seed)
    model = model_module.CLIP(**config).eval()  # open_clip's own random initialization
    with torch.no_grad():  # open_clip's published weights are often fp16: the files hold fp16, the model their values
        for p in model.parameters():
            p.copy_(p.half().float())
    g = torch.Generator().manual_seed(seed)
    size = config["vision_cfg"]["image_size"]
    images = torch.randn(2, 3, size, size, generator=g)  # already normalized: preprocessing is tested elsewhere
    text = torch.zeros(3, config["text_cfg"]["context_length"], dtype=torch.long)
    for i, length in enumerate([5, 20, 77]):  # start token, random BPE ids, end token (the largest id)
        text[i, :length] = torch.cat([torch.tensor([49406]), torch.randint(1, 49406, (length - 2,), generator=g),
                                      torch.tensor([49407])])
    with torch.no_grad():
        image_features, text_features = model.encode_image(images), model.encode_text(text)
    target = Path(out) / name
    target.mkdir(parents=True, exist_ok=True)
    state_dict = {k: v.half() if v.is_floating_point() else v for k, v in model.state_dict().items()}
    if config.get("quick_gelu"):  # older open_clip releases saved the text causal mask as a buffer
        state_dict["attn_mask"] = model.attn_mask
    torch.save(state_dict, target / "open_clip_pytorch_model.bin")
    try:
        import safetensors.torch
        safetensors.torch.save_file({k: v.contiguous() for k, v in state_dict.items()},
                                    target / "open_clip_model.safetensors")
    except ImportError:
        pass
    (target / "open_clip_config.json").write_text(json.dumps({
        "model_cfg": config,
        "preprocess_cfg": {"mean": list(constants.OPENAI_DATASET_MEAN), "std": list(constants.OPENAI_DATASET_STD),
                           "interpolation": "bicubic", "resize_mode": "shortest"}}, indent=2))
    torch.save({"images": images, "text": text, "image_features": image_features, "text_features": text_features},
               target / "reference.pt")


if __name__ == "__main__":
    open_clip_folder, out_folder, *names = sys.argv[1:]
    import_open_clip_model(open_clip_folder)
    for model_name in names:
        reference(open_clip_folder, out_folder, model_name)
