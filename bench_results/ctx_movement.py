"""How far CoOp's context moves in the default EuroSAT run: the old setting (the rotations' AdamW, lr 1e-4, shared)
against CoOp's recipe (its own SGD, lr 2e-3, momentum 0.9, weight decay 5e-4, 1 warm-up epoch at 1e-5, cosine per
epoch), on the same gradients (issue #19).

The run is train.py's default base-to-new EuroSAT run with `--prompt coop --n-ctx 16` (16 random vectors, std
0.02): 16 shots x 5 base classes = 80 images, batch 32, 2 steps per epoch, 20 epochs = 40 steps, through
train.training_step with train.make_optimizers (the new setting). After each step, the context's gradient (the one
the SGD just applied) is also given to a shadow copy of the initial context under the old setting: AdamW, lr 1e-4
with train.lr_at's warm-up and cosine, weight decay 0. Both trajectories thus see the same gradients.

    python bench_results/ctx_movement.py --root sample --model tiny      # bench_results/ctx_movement_cpu.txt
"""

import argparse
import math
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import clip_min  # noqa: E402
import data  # noqa: E402
import orthcr  # noqa: E402
import train  # noqa: E402


def movement(now, start):
    d = (now - start).detach()
    return d.abs().max().item(), d.pow(2).mean().sqrt().item()


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--root", default="sample", help="datasets in CoOp's layout (sample/: the shared EuroSAT sample)")
    p.add_argument("--model", default="tiny", help="random weights of this architecture (clip_min.random_model)")
    p.add_argument("--seed", type=int, default=1)
    a = p.parse_args()
    torch.manual_seed(a.seed)
    cfg = train.settings_from(train.parse_args(["--data", "eurosat", "--root", a.root, "--device", "cpu",
                                                "--prompt", "coop", "--n-ctx", "16", "--workers", "0"]))
    model = clip_min.random_model(a.model, seed=0)
    model.requires_grad_(False)
    params = dict(model.state_dict())
    train_set = data.build_dataset("eurosat", Path(a.root), shots=cfg.shots, seed=a.seed, subsample="base",
                                   download=False)
    adapters, context = train.init_trainables(params, cfg, a.seed)
    start = context.detach().clone()
    optimizers = train.make_optimizers(adapters, context, cfg)
    old = start.clone().requires_grad_()
    old_optimizer = torch.optim.AdamW([old], lr=train.LR, weight_decay=train.WEIGHT_DECAY)  # the old, shared one
    scaler = train.grad_scaler("cpu", cfg.precision)
    tokens, teacher_text = train.class_prompts(model, params, train_set, cfg)
    method = train.method_settings(cfg, torch.Generator().manual_seed(a.seed))
    total = cfg.epochs * data.steps_per_epoch(len(train_set.train), cfg.batch_size)
    print(f"model {a.model} (random weights, token width {context.shape[1]}), {len(train_set.train)} training "
          f"images, batch {cfg.batch_size}, {cfg.epochs} epochs = {total} steps; context {tuple(context.shape)}, "
          f"init std {start.std().item():.4f}")
    print(f"new: SGD lr {cfg.ctx_lr:g} momentum {cfg.ctx_momentum:g} weight decay {cfg.ctx_weight_decay:g}, "
          f"{cfg.ctx_warmup_epochs} warm-up epoch at {cfg.ctx_warmup_lr:g}, cosine per epoch")
    print(f"old: AdamW lr {train.LR:g} (warm-up {train.WARMUP_STEPS} steps, at most a tenth, then cosine), "
          f"weight decay {train.WEIGHT_DECAY:g}, shared with the rotations")
    print()
    print("| step | epoch | ctx lr (new) | lr (old) | gradient RMS | new: max | new: RMS | old: max | old: RMS |")
    print("|---|---|---|---|---|---|---|---|---|")
    clock, step = time.monotonic(), 0
    for epoch, images, labels in data.train_batches(train_set.train, cfg.batch_size, a.seed, cfg.epochs, 0, 0,
                                                    model.visual.input_resolution):
        lr = train._set_lr(optimizers["adapters"], train.lr_at(step, total, cfg.lr, cfg.warmup_steps))
        ctx_lr = train._set_lr(optimizers["context"], train.ctx_lr_at(epoch, cfg.epochs, cfg.ctx_lr,
                                                                      cfg.ctx_warmup_epochs, cfg.ctx_warmup_lr))
        old_lr = train._set_lr(old_optimizer, train.lr_at(step, total, train.LR, train.WARMUP_STEPS))
        train.training_step(model, params, adapters, context, images, labels, tokens, teacher_text,
                            [o for o in optimizers.values() if o], scaler, cfg.precision, method)
        old.grad = context.grad.detach().clone()  # the same gradient, under the old setting
        old_optimizer.step()
        step += 1
        if step in (1, 2, 3, 5, 10, 20, 30, 40) or step == total:
            new_max, new_rms = movement(context, start)
            old_max, old_rms = movement(old, start)
            grad_rms = context.grad.pow(2).mean().sqrt().item()
            print(f"| {step} | {epoch + 1} | {ctx_lr:.2e} | {old_lr:.2e} | {grad_rms:.2e} | {new_max:.4f} | "
                  f"{new_rms:.4f} | {old_max:.4f} | {old_rms:.4f} |")
    new_max, new_rms = movement(context, start)
    old_max, old_rms = movement(old, start)
    init_std = start.std().item()
    print()
    print(f"after {step} steps, against the initial std {init_std:.4f}:")
    print(f"  old (AdamW 1e-4, shared): max {old_max:.4f} ({old_max / init_std:.2f} std), "
          f"RMS {old_rms:.4f} ({old_rms / init_std:.2f} std)")
    print(f"  new (CoOp's SGD):         max {new_max:.4f} ({new_max / init_std:.2f} std), "
          f"RMS {new_rms:.4f} ({new_rms / init_std:.2f} std)")
    cos = torch.nn.functional.cosine_similarity((context - start).flatten(), (old - start).flatten(), dim=0)
    print(f"  cosine between the two displacements: {cos.item():.3f}; {time.monotonic() - clock:.0f} s")
    print(f"  SGD's displacement scales with the gradient, Adam's (~lr per step) does not: the gradient RMS above "
          f"is this random {a.model} model's, not trained CLIP's")
    return 0 if math.isfinite(new_max) else 1


if __name__ == "__main__":
    sys.exit(main())
