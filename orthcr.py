"""OrthCR / OrthSR: orthogonal finetuning of CLIP, regularized by the frozen zero-shot model (arXiv 2407.08374).

Parameters are dicts of tensors keyed exactly like OpenAI's state dict (`params`). The trainable part is a
second dict, `adapters`, mapping the key of each targeted weight to its free Cayley parameters P, of shape
(r, b, b) with r * b = in_features; OrthSR's CoOp variant adds one more trainable tensor, the prompt `context`.
One training step, in the names of the functions below:

    R       = cayley(P)                               block-diagonal orthogonal; R = I when P = 0
    W       = rotate_weight(W0, R) = W0 @ R.T         merge: rotate each adapted layer's input space
    z       = clip_logits(f_img(x; W), f_txt(t; W))   CLIP's classifier, the paper's Eq. 1
    z0      = the same with W0, no gradient           the frozen zero-shot "bypass" branch (the teacher)

    v1, OrthCR (cutout = random, prompt = fixed):
        x~   = cutout(x)                              a square hole, centre uniform over the image
        t    = "a photo of a {class}."                CoOp's hand-written template
    v3, OrthSR (cutout = attentive, prompt = fixed or coop):
        x~   = attentive_cutout(x, similarity_map(...))   the same hole, its centre uniform within the patch
                                                          whose teacher token is most similar to the class text
        t    = coop_prompts(ctx, class)               [SOS] ctx_1 .. ctx_n  class . [EOS], ctx learned
    both:
        loss = CE(z(x), y) + CE(z(x~), y) + LAMBDA1 * KL(p0(x) || p(x)) + LAMBDA2 * KL(p0(x~) || p(x~))

with p = softmax(z), p0 = softmax(z0): `orthcr_loss`, assembled per step by `objective`. The paper calls the
KL terms cross-regularization (v1) or self-regularization (v3); the teacher always keeps the hand-written prompt.

Precision: everything that defines the method's properties runs in fp32 with autocast off (the Cayley solve,
the merge, the logits, the softmaxes, CE and KL); autocast only touches the two towers' matrix products.
"""

from collections import defaultdict
from contextlib import contextmanager, nullcontext
from functools import partial

import torch
import torch.nn.functional as F
from torch.func import functional_call

import clip_min

# The loss weights, in one place. The paper gives 1.5 and 1 without saying which term each weighs [AIREV]:
# we put LAMBDA1 on the clean-image KL and LAMBDA2 on the Cutout KL (README: "What we chose").
LAMBDA1 = 1.5
LAMBDA2 = 1.0
CUTOUT_SIZE = 16  # hole side in pixels: Dassl's default CUTOUT_LEN (0.5 % of a 224 px image; README discusses it)
CUTOUT_MODES = ("random", "attentive", "none")
# how the KL is reduced: "batchmean" is the true KL; "mean" (PromptSRC-style sum / numel) is batchmean / C.
# The paper does not say which it used (README: "What we chose").
KL_REDUCTIONS = ("batchmean", "mean")

# the paper's targets: both linears of every MLP, in both towers
DEFAULT_TARGETS = ("mlp.c_fc", "mlp.c_proj")
TOWER_PREFIX = {"visual": "visual.transformer.resblocks.", "text": "transformer.resblocks."}


# ----------------------------------------------------------------------------------------------------
# The orthogonal transform


def skew(P):
    """Q = (P - P^T) / 2: the skew-symmetric part of each (b, b) block; (..., b, b)."""
    return (P - P.transpose(-1, -2)) / 2


def cayley(P):
    """R = (I + Q)(I - Q)^-1 for each block of P (..., b, b): exactly orthogonal, det +1, R = I at P = 0.

    Computed in fp32 (fp64 for fp64 input) with autocast off: the solve is ill-suited to half precision, and
    R feeds every adapted weight. `cayley_fast` (speed section) is the same R with a cheaper backward."""
    with _autocast_off(P):
        Q = skew(_at_least_fp32(P))
        eye = torch.eye(Q.shape[-1], dtype=Q.dtype, device=Q.device)
        # X (I - Q) = I + Q, solved for X; (I + Q) and (I - Q)^-1 commute, so X is also (I - Q)^-1 (I + Q)
        return torch.linalg.solve(eye - Q, eye + Q, left=False)


def cayley_neumann(P, terms=5):
    """Approximate Cayley: (I - Q)^-1 ~ I + Q + ... + Q^terms. Faster, NOT exactly orthogonal: the error
    grows with ||Q||^(terms+1); measure it with `orthogonality_error`."""
    with _autocast_off(P):
        Q = skew(_at_least_fp32(P))
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


def _at_least_fp32(x):
    return x if x.dtype == torch.float64 else x.float()


def _autocast_off(x):
    """Autocast disabled on x's device (a no-op on devices without autocast, such as the tests' meta device)."""
    device = x.device.type
    return torch.autocast(device, enabled=False) if torch.amp.is_autocast_available(device) else nullcontext()


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
                 and len(params[k].shape) == 2]
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


def count_parameters(adapters, context=None):
    """Trainable parameters: r * b^2 per layer (43,450,368 for ViT-B/16, r = 4, both MLP linears),
    plus n_ctx * width for CoOp's context."""
    return sum(P.numel() for P in adapters.values()) + (context.numel() if context is not None else 0)


def check_adapters(params, adapters):
    """ValueError naming the first adapter that does not fit `params` (unknown key or wrong shape)."""
    for key, P in adapters.items():
        if key not in params or len(params[key].shape) != 2:
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
    """W0 @ blockdiag(R_1..R_r).T for W0 (out, in) and R (r, b, b): each input block i becomes W0_i @ R_i^T.

    In fp32 with autocast off, and the result stays fp32: a bf16 product would round R away from orthogonal
    (max |R^T R - I| ~ 3e-3). Autocast casts W where the towers use it, exactly as it casts W0."""
    with _autocast_off(W0):
        out, r, b = W0.shape[0], R.shape[0], R.shape[-1]
        W_blocks = _at_least_fp32(W0).view(out, r, b).transpose(0, 1)  # (r, out, b)
        return torch.bmm(W_blocks, R.transpose(1, 2).to(W_blocks.dtype)).transpose(0, 1).reshape(out, r * b)


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
# The two towers and CLIP's classifier, through torch.func.functional_call


def encode_image(model, params, images, dense=False):
    """Image features (N, E); with `dense`, also the patch tokens through ln_post and visual.proj (N, grid^2, E)."""
    return functional_call(model, params, (images,), {"dense": dense}, strict=True)


def encode_text(model, params, tokens, context=None):
    """Text features (N, E) of token ids (N, L); with CoOp's `context` (n_ctx, D), of the learned prompts."""
    if context is None:
        return functional_call(model, params, (), {"text": tokens}, strict=True)
    embeddings = coop_prompts(params["token_embedding.weight"], tokens, context)
    return functional_call(model, params, (), {"text": tokens, "embeddings": embeddings}, strict=True)


def trim_tokens(tokens):
    """Drop the padding after the longest prompt's end-of-text token: exact under the causal mask, and
    77 -> ~20 tokens makes the text tower several times cheaper. Reads the ids: do it once, on the CPU."""
    return tokens[:, : int(tokens.argmax(dim=-1).max()) + 1]


def clip_logits(image_features, text_features, logit_scale):
    """logit_scale.exp() * cos(image, class prompt): CLIP's classifier (the paper's Eq. 1), (N, C).

    In fp32 with autocast off: at scale 100 the bf16 spacing of a logit is 0.125 to 0.25."""
    with _autocast_off(image_features):
        image_features = F.normalize(image_features.float(), dim=-1)
        text_features = F.normalize(text_features.float(), dim=-1)
        return logit_scale.float().exp() * image_features @ text_features.t()


def zero_shot_text_features(model, params, tokens):
    """The frozen teacher's class-prompt features (W0, no gradient), kept in fp32: computed once per class set."""
    with torch.no_grad():
        return encode_text(model, params, tokens).float()


# ----------------------------------------------------------------------------------------------------
# CoOp's learned context (OrthSR "revisits CLIP and CoOp")


def coop_tokens(classnames, n_ctx=16, ctx_init=None):
    """Token ids of CoOp's prompts, class token at the end: "X X .. X {class}." with n_ctx placeholders
    (or `ctx_init`'s words, whose n tokens then set n_ctx). The placeholders' embeddings are replaced by
    the context in `coop_prompts`; the ids still locate the end-of-text token. (C, 77)."""
    prefix = ctx_init if ctx_init else " ".join(["X"] * n_ctx)
    return clip_min.tokenize([f"{prefix} {name}." for name in classnames])


def init_context(params, n_ctx=16, ctx_init=None, generator=None):
    """CoOp's unified context (n_ctx, D): the token embeddings of `ctx_init` ("a photo of a" -> 4 vectors),
    else N(0, 0.02^2) drawn from `generator`, as CoOp initializes its generic context."""
    embedding = params["token_embedding.weight"]
    if ctx_init:
        ids = torch.tensor(clip_min.encode(ctx_init), device=embedding.device)
        context = embedding.detach()[ids].float().clone()
    else:
        context = (torch.randn(n_ctx, embedding.shape[1], generator=generator) * 0.02).to(embedding.device)
    return context.requires_grad_()


def coop_prompts(token_embedding, tokens, context):
    """The prompt embeddings (C, L, D): [SOS] ctx_1..ctx_n, then the class tokens, '.', [EOS] as embedded.
    One context for every class (CoOp's unified context)."""
    embedded = F.embedding(tokens, token_embedding)  # (C, L, D)
    n = context.shape[0]
    ctx = context.to(embedded.dtype).expand(tokens.shape[0], -1, -1)  # (C, n_ctx, D)
    return torch.cat([embedded[:, :1], ctx, embedded[:, 1 + n:]], dim=1)


# ----------------------------------------------------------------------------------------------------
# Cutout: random (v1) and attentive (v3)


def cutout(images, generator, holes=1, size=CUTOUT_SIZE):
    """A copy of `images` (N, C, H, W), in [0, 1] before normalization, with `holes` square holes of side
    `size` set to 0 per image. Centres are uniform over the pixels (DeVries & Taylor, 2017), holes are
    clipped at the border. Randomness comes only from `generator`: one CPU torch.Generator for the batch, or a
    list of N, one per image (each image's holes its own, whichever batch or process it is in)."""
    n, _, h, w = images.shape
    centres = _each_image(generator, n, lambda g, k: torch.stack([torch.randint(h, (k, holes), generator=g),
                                                                   torch.randint(w, (k, holes), generator=g)]))
    centres_y, centres_x = centres.to(images.device)  # (2, N, holes) -> each (N, holes)
    return images.masked_fill(_holes(centres_y, centres_x, h, w, size)[:, None], 0.0)


def _each_image(generator, n, draw):
    """draw(g, k): k images' draws from g, the images along dim 1. One generator draws for the whole batch at
    once; a list of n draws each image's from its own."""
    if isinstance(generator, torch.Generator):
        return draw(generator, n)
    if len(generator) != n:
        raise ValueError(f"{len(generator)} generators for {n} images: pass one per image, or one for the batch")
    return torch.cat([draw(g, 1) for g in generator], dim=1)


def similarity_map(patch_features, text_features):
    """cos(patch token, class text) per patch: (N, grid^2, E) and each image's own class feature (N, E)
    -> (N, grid, grid). The text side's pooled token is CLIP's end-of-text token (the reviewers' "[CLS]")."""
    n, tokens, _ = patch_features.shape
    grid = round(tokens ** 0.5)
    cos = F.normalize(patch_features.float(), dim=-1) @ F.normalize(text_features.float(), dim=-1)[:, :, None]
    return cos.view(n, grid, grid)  # (N, grid^2, 1) -> (N, grid, grid), patches in row-major order


def attentive_cutout(images, similarity, size=CUTOUT_SIZE, generator=None, temperature=None):
    """A copy of `images` (N, C, H, W) with one square hole of side `size`, its centre uniform within the
    patch most similar to the class text (argmax of `similarity` (N, grid, grid)): the most discriminative
    region is cut, so the model must also use the others. With `temperature`, the patch is drawn from
    softmax(similarity / temperature) instead.

    Only the patch differs from random Cutout: given the patch, the centre is uniform over its pixels and the
    hole is clipped at the border the same way, so a hole touches 1 to 4 patches as a random one does (with a
    uniform map and a temperature, the two are the same distribution). Within the patch rather than from the
    map brought to pixel resolution: the map holds one value per patch, so nearest upsampling gives this same
    law and a smoothed map would invent detail it does not have. Randomness comes only from `generator`
    (a CPU torch.Generator, or a list of one per image, as `cutout`), which is required: the centre is drawn
    even with the argmax."""
    if generator is None:
        raise ValueError("attentive_cutout draws the hole's centre within the chosen patch: "
                         "pass a seeded torch.Generator as `generator` (or a list of one per image)")
    n, _, h, w = images.shape
    grid_h, grid_w = similarity.shape[-2:]
    # the offsets first, so that the same generator gives the same offsets whichever way the patch is chosen
    # (T -> 0 then reproduces the argmax hole exactly)
    offset_y, offset_x = _each_image(generator, n, lambda g, k: torch.rand(2, k, generator=g)).to(images.device)
    flat = similarity.flatten(1)  # (N, grid^2)
    if temperature is None:
        patch = flat.argmax(dim=1).to(images.device)
    else:
        probabilities = (flat.float() / temperature).softmax(dim=1).cpu()  # a CPU generator draws on the CPU
        if isinstance(generator, torch.Generator):
            patch = torch.multinomial(probabilities, 1, generator=generator)[:, 0]
        else:  # each image's patch from its own generator, after its offsets
            patch = torch.cat([torch.multinomial(p[None], 1, generator=g)[:, 0]
                               for p, g in zip(probabilities, generator)])
        patch = patch.to(images.device)
    row, col = patch // grid_w, patch % grid_w
    centres_y = _uniform_in_cell(row, offset_y, h, grid_h)[:, None]  # (N, 1)
    centres_x = _uniform_in_cell(col, offset_x, w, grid_w)[:, None]
    return images.masked_fill(_holes(centres_y, centres_x, h, w, size)[:, None], 0.0)


def _uniform_in_cell(index, u, length, cells):
    """The pixel at fraction u in [0, 1) of cell `index` when `length` pixels are cut into `cells` cells
    (cell i spans [i * length // cells, (i + 1) * length // cells)): uniform over the cell's pixels for uniform u."""
    low, high = index * length // cells, (index + 1) * length // cells
    return torch.minimum(low + (u * (high - low)).long(), high - 1)


def _holes(centres_y, centres_x, h, w, size):
    """(N, H, W) mask of the squares of side `size` around the centres (N, holes), clipped at the border.
    The square around centre c spans [c - size // 2, c - size // 2 + size): the same rule for both Cutouts."""
    rows = torch.arange(h, device=centres_y.device)
    cols = torch.arange(w, device=centres_x.device)
    top, left = centres_y[..., None] - size // 2, centres_x[..., None] - size // 2
    in_rows = (rows >= top) & (rows < top + size)  # (N, holes, H)
    in_cols = (cols >= left) & (cols < left + size)  # (N, holes, W)
    return (in_rows[..., :, None] & in_cols[..., None, :]).any(dim=1)  # (N, H, W)


def cutout_views(mode, generator, holes=1, size=CUTOUT_SIZE, temperature=None):
    """Cutout as `objective` takes it, a function (images, similarity) -> the Cutout copies, where `similarity()`
    gives the teacher's map of the clean images (N, grid, grid) when asked: random Cutout (v1) never asks,
    attentive Cutout (v3) does. None for mode "none" (no Cutout). Randomness only from `generator` (one for the
    batch, or one per image: train.py gives each image its own, so that any number of processes draws the same
    holes)."""
    if mode == "random":
        return lambda images, similarity: cutout(images, generator, holes, size)
    if mode == "attentive":
        return lambda images, similarity: attentive_cutout(images, similarity(), size, generator, temperature)
    assert mode == "none", mode
    return None


# ----------------------------------------------------------------------------------------------------
# The loss


def kl_to_zero_shot(student_logits, teacher_logits, reduction="batchmean"):
    """KL(p_zero-shot || p_finetuned) for logits (N, C); the teacher's distribution is the target.

    reduction "batchmean": summed over classes, averaged over the batch, the true KL (the default).
    reduction "mean": averaged over batch and classes, as PromptSRC-style code does: batchmean / C, so the
    same lambda weighs it C times less (5 times on EuroSAT base, 1000 times on ImageNet)."""
    if reduction not in KL_REDUCTIONS:
        raise ValueError(f"KL reduction {reduction!r}: expected one of {', '.join(KL_REDUCTIONS)}")
    kl = F.kl_div(F.log_softmax(student_logits.float(), dim=-1), F.log_softmax(teacher_logits.float(), dim=-1),
                  log_target=True, reduction="batchmean")
    # "mean" divided here: torch's own reduction="mean" warns at every call and is announced to change
    return kl / student_logits.shape[-1] if reduction == "mean" else kl


def orthcr_loss(logits, logits_cut, zs_logits, zs_logits_cut, labels, lambda1=LAMBDA1, lambda2=LAMBDA2,
                reduction="batchmean"):
    """CE(clean) + CE(cutout) + lambda1 * KL(clean) + lambda2 * KL(cutout); without Cutout views
    (`logits_cut` None: the "w/o CutOut" ablation) CE(clean) + lambda1 * KL(clean). Both KLs use `reduction`
    (see `kl_to_zero_shot`). Returns (loss, terms)."""
    terms = {"ce": F.cross_entropy(logits.float(), labels), "kl": kl_to_zero_shot(logits, zs_logits, reduction)}
    loss = terms["ce"] + lambda1 * terms["kl"]
    if logits_cut is not None:
        terms["ce_cutout"] = F.cross_entropy(logits_cut.float(), labels)
        terms["kl_cutout"] = kl_to_zero_shot(logits_cut, zs_logits_cut, reduction)
        loss = loss + terms["ce_cutout"] + lambda2 * terms["kl_cutout"]
    return loss, terms


def objective(model, params, adapters, images, labels, tokens, teacher_text, *, context=None, cutout=None,
              lambda1=LAMBDA1, lambda2=LAMBDA2, reduction="batchmean", transform=cayley,
              normalize=clip_min.normalize, rotate_inputs=True):
    """One step's loss for a batch of [0, 1] training images (N, 3, H, W). `tokens` are the student's class
    prompts (trimmed; CoOp's when `context` is given), `teacher_text` the teacher's fp32 class features.
    `transform` turns P into R (cayley, cayley_fast, cayley_neumann); `reduction` is the KLs' (KL_REDUCTIONS);
    `cutout` makes the Cutout copies
    (cutout_views: random or attentive; None: no Cutout views and terms, the "w/o CutOut" ablation).
    `rotate_inputs`: the speed device of `student` (False: the plain merge).

    The teacher sees the clean images and the Cutout copies without gradient; when `cutout` asks for the
    teacher's similarity map (attentive Cutout), the teacher's clean pass yields it with its patch tokens (no
    extra forward pass). The student (merged weights, computed once here for every layer) sees the same views.
    Returns (loss, terms)."""
    n = images.shape[0]
    with torch.no_grad():  # the frozen zero-shot branch: W0, no gradient
        clean = []  # the teacher's clean features, when the similarity map was asked for

        def similarity():  # the teacher's clean pass, with its patch tokens
            features, patches = encode_image(model, params, normalize(images), dense=True)
            clean.append(features)
            return similarity_map(patches, teacher_text[labels])

        cut = None if cutout is None else cutout(images, similarity)
        if clean:
            teacher_features = torch.cat([clean[0], encode_image(model, params, normalize(cut))])
        else:
            teacher_features = encode_image(model, params, normalize(_views(images, cut)))
        zs = clip_logits(teacher_features, teacher_text, params["logit_scale"])
    # the student: merge(params, adapters, transform), through the speed device `student` (the same network)
    with student(model, params, adapters, transform, rotate_inputs) as merged:
        logits = clip_logits(encode_image(model, merged, normalize(_views(images, cut))),
                             encode_text(model, merged, tokens, context), merged["logit_scale"])
    if cut is None:
        return orthcr_loss(logits, None, zs, None, labels, lambda1, lambda2, reduction)
    return orthcr_loss(logits[:n], logits[n:], zs[:n], zs[n:], labels, lambda1, lambda2, reduction)


def _views(images, cut):
    """The clean images, then their Cutout copies: (N or 2N, 3, H, W), one batch through each tower."""
    return images if cut is None else torch.cat([images, cut])


# ----------------------------------------------------------------------------------------------------
# What orthogonal finetuning keeps


def hyperspherical_energy(W, s=1.0, eps=1e-12):
    """sum_{i<j} ||w_i/|w_i| - w_j/|w_j|||^-s over the neurons (rows) of W (out, in). Rotating every neuron by
    the same R leaves every pairwise angle, hence this energy, unchanged (the OFT argument)."""
    unit = F.normalize(W.double(), dim=1)
    distances = torch.cdist(unit, unit)  # (out, out)
    i, j = torch.triu_indices(W.shape[0], W.shape[0], offset=1)
    return (distances[i, j].clamp_min(eps) ** -s).sum()


# ----------------------------------------------------------------------------------------------------
# Speed devices. Each computes exactly what a function above computes; tests/test_orthcr.py checks they agree.


def cayley_fast(P):
    """`cayley` with a hand-written backward: two matmuls from R instead of autograd through the solve
    (no LU factors kept alive until the backward). The default in train.py."""
    with _autocast_off(P):
        return _CayleyFromSkew.apply(skew(_at_least_fp32(P)))


class _CayleyFromSkew(torch.autograd.Function):
    """R = (I + Q)(I - Q)^-1 from a skew-symmetric Q. R = 2 (I - Q)^-1 - I, so dR = 2 A^-1 dQ A^-1 with
    A^-1 = (R + I) / 2, and dL/dQ = (R + I)^T G (R + I)^T / 2."""

    @staticmethod
    def forward(ctx, Q):
        eye = torch.eye(Q.shape[-1], dtype=Q.dtype, device=Q.device)
        R = torch.linalg.solve(eye - Q, eye + Q, left=False)
        ctx.save_for_backward(R)
        return R

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, G):
        (R,) = ctx.saved_tensors
        half_inverse_t = (R + torch.eye(R.shape[-1], dtype=R.dtype, device=R.device)).transpose(-1, -2)  # 2 A^-T
        return half_inverse_t @ G @ half_inverse_t / 2


# Rotating a layer's input instead of its weight: F.linear(x, W0 @ R.T) = F.linear(x @ R, W0), blockwise, the
# same layer (OFT's own formulation, and PEFT's). What differs is the backward over M tokens. Merged, W needs its
# gradient G^T x, a (M, out, in) product; rotated, W0 needs none, and x @ R costs three (M, in, b) products
# (forward, and the backward's two). So rotating the input is cheaper when 3 b < out: c_fc (b = in / r, out = 4 in),
# not c_proj (b = out at r = 4). For ViT-B/16 at 32 images that drops 11 (6304 x 3072 x 768) products a step.


def rotate_input(x, R):
    """x @ blockdiag(R_1..R_r) for x (..., r * b) and R (r, b, b): each input block x_i becomes x_i @ R_i, so that
    F.linear(rotate_input(x, R), W0) = F.linear(x, rotate_weight(W0, R)). In fp32 with autocast off, as the merge."""
    with _autocast_off(x):
        r, b = R.shape[0], R.shape[-1]
        blocks = _at_least_fp32(x).reshape(-1, r, b).transpose(0, 1)  # (r, M, b), M = x.numel() / (r b)
        return torch.bmm(blocks, R.to(blocks.dtype)).transpose(0, 1).reshape(x.shape)  # (M, r, b) -> x's shape


def _rotates_input(key, W0, R):
    """Whether adapted weight `key` is cheaper rotated through its input (an MLP's c_fc, with 3 b < out)."""
    return key.endswith("mlp.c_fc.weight") and 3 * R.shape[-1] < W0.shape[0]


@contextmanager
def student(model, params, adapters, transform=cayley, rotate_inputs=True):
    """The student's parameters, merge(params, adapters, transform), for `model` within the context.

    With `rotate_inputs` (the speed device), the weights `_rotates_input` picks keep W0 in the dict and their R goes
    to the input instead: the MLP's input is c_fc's, so a forward pre-hook on each such MLP rotates it, for as long
    as the context lasts. Each kept W0 is the student's own tensor (a view of W0, no copy), and a hook rotates only
    the passes that run on it: a pass on other parameters while the context is open (the teacher's W0, another
    student's or a plain merge) runs as it would outside."""
    if not rotate_inputs:
        yield merge(params, adapters, transform)
        return
    R = rotations(adapters, transform)
    on_input = {k for k in R if _rotates_input(k, params[k], R[k])}
    merged = dict(params)
    merged.update({k: rotate_weight(params[k], R[k]) if k not in on_input else params[k].view_as(params[k])
                   for k in R})
    hooks = []
    try:  # registered inside the try: a key with no module here removes the hooks already registered
        for k in sorted(on_input):
            mlp = model.get_submodule(k.removesuffix(".c_fc.weight"))
            hooks.append(mlp.register_forward_pre_hook(partial(_rotate_first_input, weight=merged[k], R=R[k])))
        yield merged
    finally:
        for hook in hooks:
            hook.remove()


def _rotate_first_input(module, args, weight, R):
    if module.c_fc.weight is not weight:  # a pass on other parameters than the student's
        return None
    return (rotate_input(args[0], R), *args[1:])
