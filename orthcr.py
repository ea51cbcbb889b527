"""OrthCR: orthogonal finetuning of CLIP with cross-regularization (arXiv 2407.08374), as pure functions.

Parameters are dicts of tensors keyed exactly like OpenAI's state dict (`params`). The trainable part is a
second dict, `adapters`, mapping the key of each targeted weight to its free Cayley parameters
P, of shape (r, b, b) with r * b = in_features. One training step:

    R      = cayley(P)                          # block-diagonal orthogonal, R = I when P = 0     (eq. 1)
    W      = W0 @ R.T                           # merge: rotate each layer's input space          (eq. 2)
    logits = logit_scale.exp() * cos(f_img(x; W), f_txt(t; W))
    loss   = CE(clean) + CE(cutout) + l1 * KL(p0 || p)(clean) + l2 * KL(p0 || p)(cutout)       (eq. 3)

where p0 are the frozen zero-shot model's class probabilities (W0, no gradient): the "cross-regularization".
"""

from collections import defaultdict

import torch
import torch.nn.functional as F
from torch.func import functional_call

import clip_min

# the paper's targets: both linears of every MLP, in both towers
DEFAULT_TARGETS = ("mlp.c_fc", "mlp.c_proj")
TOWER_PREFIX = {"visual": "visual.transformer.resblocks.", "text": "transformer.resblocks."}


# ----------------------------------------------------------------------------------------------------
# The orthogonal transform


def skew(P):
    """Q = (P - P^T) / 2: the skew-symmetric part of each (b, b) block; (..., b, b)."""
    return (P - P.transpose(-1, -2)) / 2


def at_least_fp32(x):
    return x if x.dtype == torch.float64 else x.float()


class CayleyFromSkew(torch.autograd.Function):
    """R = (I + Q)(I - Q)^-1 from a skew-symmetric Q, with a backward of two matmuls instead of a second solve.

    R = 2 (I - Q)^-1 - I, so dR = 2 A^-1 dQ A^-1 with A^-1 = (R + I) / 2, and dL/dQ = (R + I)^T G (R + I)^T / 2.
    Saving R alone (no LU factors) also keeps less memory alive until the backward."""

    @staticmethod
    def forward(ctx, Q):
        eye = torch.eye(Q.shape[-1], dtype=Q.dtype, device=Q.device)
        # X (I - Q) = (I + Q); the factors commute, so this is also (I - Q)^-1 (I + Q)
        R = torch.linalg.solve(eye - Q, eye + Q, left=False)
        ctx.save_for_backward(R)
        return R

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, G):
        (R,) = ctx.saved_tensors
        half_inverse_t = (R + torch.eye(R.shape[-1], dtype=R.dtype, device=R.device)).transpose(-1, -2)  # 2 A^-T
        return half_inverse_t @ G @ half_inverse_t / 2


def cayley(P):
    """R = (I + Q)(I - Q)^-1 for each block of P (..., b, b): exactly orthogonal, det +1, R = I at P = 0.

    Computed in fp32 or fp64 (autocast off): the solve is ill-suited to half precision, and R feeds every weight.
    """
    with torch.autocast(P.device.type, enabled=False):
        return CayleyFromSkew.apply(skew(at_least_fp32(P)))


def cayley_neumann(P, terms=5):
    """Approximate Cayley: (I - Q)^-1 ~ I + Q + ... + Q^terms. Faster, NOT exactly orthogonal: the error
    grows with ||Q||^(terms+1); measure it with `orthogonality_error`."""
    with torch.autocast(P.device.type, enabled=False):
        Q = skew(at_least_fp32(P))
        eye = torch.eye(Q.shape[-1], dtype=Q.dtype, device=Q.device)
        inverse, power = eye, eye
        for _ in range(terms):
            power = power @ Q
            inverse = inverse + power
        return (eye + Q) @ inverse


def orthogonality_error(R):
    """max |R^T R - I| over all blocks of R (..., b, b)."""
    eye = torch.eye(R.shape[-1], dtype=R.dtype, device=R.device)
    return (R.transpose(-1, -2) @ R - eye).abs().max()


# ----------------------------------------------------------------------------------------------------
# Adapters: which weights, how many blocks


def target_keys(params, targets=DEFAULT_TARGETS, towers=("visual", "text")):
    """Keys of the weights to adapt, in state-dict order: `<tower prefix><i>.<target>.weight`
    (and `attn.in_proj` -> `...attn.in_proj_weight`). Raises ValueError when a target matches nothing."""
    unknown = set(towers) - set(TOWER_PREFIX)
    if unknown:
        raise ValueError(f"unknown towers {sorted(unknown)}: expected some of {sorted(TOWER_PREFIX)}")
    keys = []
    for target in targets:
        found = [k for k in params
                 if any(k.startswith(TOWER_PREFIX[t]) for t in towers)
                 and (k.endswith(f".{target}.weight") or k.endswith(f".{target}_weight"))
                 and params[k].dim() == 2]
        if not found:
            raise ValueError(f"target {target!r} matches no 2-D weight of the {'/'.join(towers)} tower(s); "
                             f"expected a layer name such as 'mlp.c_fc', 'mlp.c_proj', 'attn.out_proj', 'attn.in_proj'")
        keys += found
    order = {k: i for i, k in enumerate(params)}
    return sorted(set(keys), key=order.get)


def init_adapters(params, targets=DEFAULT_TARGETS, blocks=4, towers=("visual", "text")):
    """P = 0 of shape (blocks, in/blocks, in/blocks) for every targeted weight: R = I, the model is zero-shot CLIP."""
    adapters = {}
    for key in target_keys(params, targets, towers):
        in_features = params[key].shape[1]
        if in_features % blocks:
            raise ValueError(f"{key}: input dimension {in_features} is not divisible by r = {blocks} blocks")
        b = in_features // blocks
        adapters[key] = torch.zeros(blocks, b, b, device=params[key].device, requires_grad=True)
    return adapters


def count_parameters(adapters):
    """Trainable parameters: r * b^2 per layer (43,450,368 for ViT-B/16, r = 4, both MLP linears)."""
    return sum(P.numel() for P in adapters.values())


def check_adapters(params, adapters):
    """ValueError naming the first adapter that does not fit `params` (unknown key or wrong shape)."""
    for key, P in adapters.items():
        if key not in params or params[key].dim() != 2:
            raise ValueError(f"adapter {key!r} matches no 2-D weight of the model")
        in_features = params[key].shape[1]
        if P.dim() != 3 or P.shape[1] != P.shape[2] or P.shape[0] * P.shape[1] != in_features:
            raise ValueError(f"adapter {key!r} has shape {tuple(P.shape)}; the weight {tuple(params[key].shape)} "
                             f"expects (r, {in_features}/r, {in_features}/r)")


# ----------------------------------------------------------------------------------------------------
# Merging: W = W0 @ R.T, once per step for all layers


def rotations(adapters, transform=cayley):
    """R for every adapter, with one batched call of `transform` per block size (not one per layer)."""
    groups = defaultdict(list)
    for key, P in adapters.items():
        groups[P.shape[-1]].append(key)
    R = {}
    for keys in groups.values():
        blocks = transform(torch.cat([adapters[k] for k in keys]))  # (sum of r, b, b)
        R.update(zip(keys, blocks.split([adapters[k].shape[0] for k in keys])))
    return R


def rotate_weight(W0, R):
    """W0 @ blockdiag(R_1..R_r).T for W0 (out, in) and R (r, b, b): each input block i becomes W0_i @ R_i^T."""
    out, r, b = W0.shape[0], R.shape[0], R.shape[-1]
    W_blocks = W0.view(out, r, b).transpose(0, 1)  # (r, out, b)
    return torch.bmm(W_blocks, R.transpose(1, 2).to(W0.dtype)).transpose(0, 1).reshape(out, r * b)


def merge(params, adapters, transform=cayley):
    """The finetuned parameters: every adapted weight rotated, everything else (biases too) shared with W0."""
    merged = dict(params)
    for key, R in rotations(adapters, transform).items():
        merged[key] = rotate_weight(params[key], R)
    return merged


def export_state_dict(params, adapters, transform=cayley):
    """Merged weights as a plain state dict in the official key format (loads in OpenAI's `clip` code).
    Untouched tensors are shared with `params`, not copied: evaluating a merged ViT-B/16 costs no second model."""
    check_adapters(params, adapters)
    with torch.no_grad():
        return {k: v.detach().contiguous() for k, v in merge(params, adapters, transform).items()}


# ----------------------------------------------------------------------------------------------------
# Forward passes and logits through torch.func.functional_call


def encode_image(model, params, images):
    return functional_call(model, params, (images,))


def encode_text(model, params, tokens):
    return functional_call(model, params, (), {"text": tokens})


def trim_tokens(tokens):
    """Drop the padding after the longest prompt's end-of-text token: exact under the causal mask, and
    77 -> ~20 tokens makes the text tower several times cheaper."""
    return tokens[:, : int(tokens.argmax(dim=-1).max()) + 1]


def clip_logits(image_features, text_features, logit_scale):
    """logit_scale.exp() * cos(image, class prompt): CLIP's classifier, (N, C)."""
    image_features = F.normalize(image_features, dim=-1)
    text_features = F.normalize(text_features, dim=-1)
    return logit_scale.exp() * image_features @ text_features.t()


# ----------------------------------------------------------------------------------------------------
# Cutout and the loss


def cutout(images, generator, holes=1, size=16):
    """A copy of `images` (N, C, H, W), in [0, 1] before normalization, with `holes` square holes of side
    `size` set to 0 per image. Centres are uniform over the pixels (DeVries & Taylor, 2017), holes are
    clipped at the border. Randomness comes only from `generator` (a CPU torch.Generator)."""
    n, _, h, w = images.shape
    centres_y = torch.randint(h, (n, holes), generator=generator).to(images.device)
    centres_x = torch.randint(w, (n, holes), generator=generator).to(images.device)
    rows = torch.arange(h, device=images.device)
    cols = torch.arange(w, device=images.device)
    in_rows = (rows >= centres_y[..., None] - size // 2) & (rows < centres_y[..., None] + size - size // 2)  # (N, holes, H)
    in_cols = (cols >= centres_x[..., None] - size // 2) & (cols < centres_x[..., None] + size - size // 2)  # (N, holes, W)
    hole = (in_rows[..., :, None] & in_cols[..., None, :]).any(dim=1)  # (N, H, W)
    return images.masked_fill(hole[:, None], 0.0)


def kl_to_zero_shot(student_logits, teacher_logits):
    """KL(p_zero-shot || p_finetuned), averaged over the batch: the teacher's distribution is the target."""
    return F.kl_div(F.log_softmax(student_logits.float(), dim=-1), F.log_softmax(teacher_logits.float(), dim=-1),
                    log_target=True, reduction="batchmean")


def orthcr_loss(logits, logits_cut, zs_logits, zs_logits_cut, labels, lambda1=1.5, lambda2=1.0):
    """CE(clean) + CE(cutout) + lambda1 * KL(clean) + lambda2 * KL(cutout)   (eq. 3). Returns (loss, terms)."""
    terms = {
        "ce": F.cross_entropy(logits.float(), labels),
        "ce_cutout": F.cross_entropy(logits_cut.float(), labels),
        "kl": kl_to_zero_shot(logits, zs_logits),
        "kl_cutout": kl_to_zero_shot(logits_cut, zs_logits_cut),
    }
    loss = terms["ce"] + terms["ce_cutout"] + lambda1 * terms["kl"] + lambda2 * terms["kl_cutout"]
    return loss, terms


def zero_shot_text_features(model, params, tokens):
    """The frozen teacher's class-prompt features (W0, no gradient): computed once per class set."""
    with torch.no_grad():
        return encode_text(model, params, trim_tokens(tokens))


def objective(model, params, adapters, images, labels, tokens, zs_text_features, generator,
              lambda1=1.5, lambda2=1.0, holes=1, size=16, normalize=clip_min.normalize, transform=cayley):
    """One step's OrthCR loss for a batch of [0, 1] training images (N, 3, H, W) and class-prompt `tokens`.

    The student (merged weights) and the frozen zero-shot teacher (params) each see the clean images and
    a Cutout copy; the merge is computed once here for every layer. Returns (loss, terms)."""
    x = normalize(torch.cat([images, cutout(images, generator, holes, size)]))  # (2N, 3, H, W): clean, cutout
    n = images.shape[0]
    with torch.no_grad():
        zs = clip_logits(encode_image(model, params, x), zs_text_features, params["logit_scale"])
    merged = merge(params, adapters, transform)
    text_features = encode_text(model, merged, trim_tokens(tokens))
    logits = clip_logits(encode_image(model, merged, x), text_features, merged["logit_scale"])
    return orthcr_loss(logits[:n], logits[n:], zs[:n], zs[n:], labels, lambda1, lambda2)


# ----------------------------------------------------------------------------------------------------
# What orthogonal finetuning keeps


def hyperspherical_energy(W, s=1.0, eps=1e-12):
    """sum_{i<j} ||w_i/|w_i| - w_j/|w_j|||^-s over the neurons (rows) of W (out, in). Rotating every neuron by
    the same R leaves every pairwise angle, hence this energy, unchanged (the OFT argument)."""
    unit = F.normalize(W.double(), dim=1)
    distances = torch.cdist(unit, unit)  # (out, out)
    i, j = torch.triu_indices(W.shape[0], W.shape[0], offset=1)
    return (distances[i, j].clamp_min(eps) ** -s).sum()
