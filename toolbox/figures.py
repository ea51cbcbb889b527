"""Figures a command can draw instead of training: the Cutout grid (--cutout-grid PNG), the first training batch as
the loop sees it, with its random hole, its attentive hole and the teacher's similarity map (docs/cutout.md,
figures/cutout_grid.png).

Nothing here imports train.py: its functions (the class prompts, autocast, the normalizer) come in `ref`
(toolbox/orchestration.Reference)."""

import torch
from PIL import Image, ImageDraw, ImageFont

import data
import orthcr


def cutout_grid(model, params, train_set, cfg, seed, ref, n=8):
    """A PNG-ready picture of the first training batch: per image, the image, its random Cutout hole, its
    attentive Cutout hole, and the teacher's patch-to-class-text similarity as a heat overlay (red = similar)."""
    first = data.train_batches(train_set.train, min(n, len(train_set.train)), seed, 1, 0, 0,
                               model.visual.input_resolution)
    _, images, labels, positions = next(iter(first))  # the first batch of epoch 1, as training sees it
    _, teacher_text = ref.class_prompts(model, params, train_set, cfg)
    with torch.no_grad(), ref.autocast(cfg.device, cfg.precision):
        _, patches = orthcr.encode_image(model, params, ref.normalizer(model)(images.to(cfg.device)), dense=True)
    similarity = orthcr.similarity_map(patches, teacher_text[labels.to(cfg.device)]).cpu()  # (N, grid, grid)
    holes = lambda: data.image_generators(seed, 0, positions, data.CUTOUT_STREAM)  # noqa: E731 (training's draws)
    random_cut = orthcr.cutout(images, holes(), cfg.cutout_holes, cfg.cutout_size)
    attentive_cut = orthcr.attentive_cutout(images, similarity, cfg.cutout_size, holes(), cfg.cutout_temperature)
    heat = torch.nn.functional.interpolate(similarity[:, None], size=images.shape[-2:], mode="nearest")  # (N, 1, H, W)
    low, high = heat.amin(dim=(2, 3), keepdim=True), heat.amax(dim=(2, 3), keepdim=True)
    heat = (heat - low) / (high - low).clamp_min(1e-12)
    red = torch.cat([torch.ones_like(heat), torch.zeros_like(heat), torch.zeros_like(heat)], dim=1)
    overlay = images * (1 - 0.6 * heat) + red * 0.6 * heat
    columns = [images, random_cut, attentive_cut, overlay]  # each (N, 3, H, W) in [0, 1]
    grid = torch.cat([torch.cat(list(column), dim=1) for column in columns], dim=2)  # (3, N*H, 4*W)
    picture = Image.fromarray((grid.permute(1, 2, 0).clamp(0, 1) * 255).round().to(torch.uint8).numpy())
    return _with_header(picture, ["image", "random hole", "attentive hole", "similarity"])


def _with_header(picture, titles, height=20):
    """The picture under a white band naming its columns."""
    framed = Image.new("RGB", (picture.width, picture.height + height), "white")
    framed.paste(picture, (0, height))
    draw, width = ImageDraw.Draw(framed), picture.width // len(titles)
    font = ImageFont.load_default(size=min(12, max(6, width // 10)))
    for i, title in enumerate(titles):
        draw.text((i * width + 3, 3), title, fill="black", font=font)
    return framed
