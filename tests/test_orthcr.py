"""Properties of the method: orthogonality, norm preservation, identity at init, merge = rotated inputs, loss."""

import copy
import re

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings, strategies as st

import clip_min
import orthcr
from conftest import DEVICES, ROOT, load_openai

SETTINGS = settings(max_examples=25, deadline=None)


def random_P(seed, blocks, size, scale, dtype, device):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(blocks, size, size, generator=g, dtype=torch.float64) * scale).to(dtype).to(device)


# ----------------------------------------------------------------------------------------------------
# The Cayley transform


@pytest.mark.parametrize("device", DEVICES)
@SETTINGS
@given(seed=st.integers(0, 2**31), blocks=st.integers(1, 6), size=st.integers(1, 48),
       scale=st.floats(0.0, 3.0), dtype=st.sampled_from([torch.float32, torch.float64]))
def test_cayley_is_orthogonal_with_det_one(device, seed, blocks, size, scale, dtype):
    P = random_P(seed, blocks, size, scale, dtype, device)
    R = orthcr.cayley(P.double()) if dtype == torch.float64 else orthcr.cayley(P)
    eye = torch.eye(size, dtype=R.dtype, device=device)
    tol = 1e-12 if dtype == torch.float64 else 1e-5 * size
    assert (R.transpose(-1, -2) @ R - eye).abs().max() <= tol
    assert (R @ R.transpose(-1, -2) - eye).abs().max() <= tol
    det = torch.linalg.det(R.double())
    assert torch.allclose(det, torch.ones_like(det), atol=1e-4 if dtype == torch.float32 else 1e-10)


@pytest.mark.parametrize("device", DEVICES)
@SETTINGS
@given(seed=st.integers(0, 2**31), blocks=st.integers(1, 4), size=st.integers(1, 32),
       scale=st.floats(0.0, 3.0), n=st.integers(1, 8))
def test_cayley_preserves_norms(device, seed, blocks, size, scale, n):
    P = random_P(seed, blocks, size, scale, torch.float64, device)
    R = orthcr.cayley(P)
    x = torch.randn(n, blocks, size, dtype=torch.float64, generator=torch.Generator().manual_seed(seed)).to(device)
    Rx = torch.einsum("rij,nrj->nri", R, x)
    assert torch.allclose(Rx.norm(dim=-1), x.norm(dim=-1), rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("device", DEVICES)
@given(blocks=st.integers(1, 6), size=st.integers(1, 64))
@settings(max_examples=15, deadline=None)
def test_cayley_is_exactly_identity_at_zero(device, blocks, size):
    R = orthcr.cayley(torch.zeros(blocks, size, size, device=device))
    assert torch.equal(R, torch.eye(size, device=device).expand(blocks, size, size))


@pytest.mark.parametrize("device", DEVICES)
@settings(max_examples=10, deadline=None)
@given(seed=st.integers(0, 2**31), blocks=st.integers(1, 3), size=st.integers(1, 8), scale=st.floats(0.0, 2.0))
def test_cayley_fast_equals_the_plain_formula_forward_and_backward(device, seed, blocks, size, scale):
    # cayley_fast has a hand-written backward (from R, no second solve): check it against finite differences
    # and against autograd through (I + Q) @ inv(I - Q)
    P = random_P(seed, blocks, size, scale, torch.float64, device).requires_grad_()
    assert torch.autograd.gradcheck(orthcr.cayley_fast, (P,))
    assert torch.equal(orthcr.cayley_fast(P), orthcr.cayley(P))
    G = torch.randn(P.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(seed + 1)).to(device)
    Q = orthcr.skew(P)
    eye = torch.eye(size, dtype=P.dtype, device=device)
    (expected,) = torch.autograd.grad(((eye + Q) @ torch.linalg.inv(eye - Q) * G).sum(), P)
    (ours,) = torch.autograd.grad((orthcr.cayley_fast(P) * G).sum(), P)
    assert torch.allclose(ours, expected, atol=1e-10)
    (plain,) = torch.autograd.grad((orthcr.cayley(P) * G).sum(), P)
    assert torch.allclose(plain, expected, atol=1e-10)


def test_cayley_is_computed_in_fp32_under_autocast():
    P = random_P(0, 2, 16, 0.5, torch.float32, "cpu")
    with torch.autocast("cpu", dtype=torch.bfloat16):
        R = orthcr.cayley(P)
    assert R.dtype == torch.float32
    assert orthcr.orthogonality_error(R) < 1e-5


def test_neumann_is_approximate_and_its_error_is_measured():
    small = random_P(0, 4, 32, 0.01, torch.float32, "cpu")
    exact, approx = orthcr.cayley(small), orthcr.cayley_neumann(small, terms=5)
    assert (exact - approx).abs().max() < 1e-5  # close to Cayley for small Q
    large = random_P(0, 4, 32, 0.5, torch.float64, "cpu")
    # not orthogonal for a large Q: the error is reported, not hidden
    assert orthcr.orthogonality_error(orthcr.cayley_neumann(large, terms=5)) > 1e-3
    assert orthcr.orthogonality_error(orthcr.cayley(large)) < 1e-12


# ----------------------------------------------------------------------------------------------------
# Adapters on the model


def params_of(model, device="cpu"):
    return {k: v.to(device) for k, v in model.state_dict().items()}


def randomize(adapters, seed, scale):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for P in adapters.values():
            P.copy_(torch.randn(P.shape, generator=g) * scale)
    return adapters


def test_default_count_on_vit_b16_shapes_is_the_papers_43_45M():
    with torch.device("meta"):
        model = clip_min.CLIP(**clip_min.CONFIGS["ViT-B/16"])
    adapters = orthcr.init_adapters(dict(model.state_dict()))
    assert orthcr.count_parameters(adapters) == 12 * (768**2 + 3072**2 + 512**2 + 2048**2) // 4 == 43_450_368
    assert len(adapters) == 48 and all(P.shape[0] == 4 for P in adapters.values())


def test_targets_and_towers_are_configurable(tiny_model):
    params = params_of(tiny_model)
    visual_only = orthcr.init_adapters(params, towers=("visual",))
    assert visual_only and all(k.startswith("visual.") for k in visual_only)
    attn = orthcr.init_adapters(params, targets=("attn.in_proj", "attn.out_proj"), blocks=2)
    assert set(attn) == {k for k in params if k.endswith("attn.in_proj_weight") or k.endswith("attn.out_proj.weight")}


@pytest.mark.parametrize("device", DEVICES)
def test_merged_model_equals_base_bit_for_bit_at_init(tiny_model, device):
    params = params_of(tiny_model, device)
    model = copy.deepcopy(tiny_model).to(device)
    adapters = orthcr.init_adapters(params)
    merged = orthcr.merge(params, adapters)
    g = torch.Generator().manual_seed(0)
    images = torch.randn(3, 3, 32, 32, generator=g).to(device)
    tokens = clip_min.tokenize(["a photo of a cat.", "a dog"]).to(device)
    with torch.no_grad():
        assert torch.equal(orthcr.encode_image(model, merged, images), model.encode_image(images))
        assert torch.equal(orthcr.encode_text(model, merged, tokens), model.encode_text(tokens))


def rotate_inputs_model(model, adapters):
    """An independent formulation: keep W0 and rotate each adapted layer's input, x -> x R (per block)."""
    model = copy.deepcopy(model)
    for module in model.modules():  # the plain formula calls c_fc and c_proj as modules, so their pre-hooks run
        if isinstance(module, clip_min.MLP):
            module.recompute_activation = False
    modules = dict(model.named_modules())
    for key, P in adapters.items():
        R = orthcr.cayley(P.detach().double()).float()
        module_name = key.rsplit(".", 1)[0]

        def rotate(module, args, R=R):
            x = args[0]
            blocks = x.unflatten(-1, (R.shape[0], R.shape[1]))  # (..., r, b)
            return (torch.einsum("...rb,rbc->...rc", blocks, R).flatten(-2),)

        modules[module_name].register_forward_pre_hook(rotate)
    return model


@pytest.mark.parametrize("device", DEVICES)
@settings(max_examples=6, deadline=None)
@given(seed=st.integers(0, 2**31), scale=st.floats(0.01, 1.0), blocks=st.sampled_from([1, 2, 4]))
def test_merge_equals_rotating_the_inputs(tiny_model, device, seed, scale, blocks):
    model = tiny_model.to(device)
    params = params_of(model, device)
    adapters = randomize(orthcr.init_adapters(params, blocks=blocks), seed, scale)
    merged = orthcr.merge(params, adapters)
    reference = rotate_inputs_model(model, adapters)
    g = torch.Generator().manual_seed(seed)
    images = torch.randn(2, 3, 32, 32, generator=g).to(device)
    tokens = torch.randint(1, 49000, (2, 77), generator=g).to(device)
    tokens[:, 9] = 49407
    with torch.no_grad():
        for ours, ref in [(orthcr.encode_image(model, merged, images), reference.encode_image(images)),
                          (orthcr.encode_text(model, merged, tokens), reference.encode_text(tokens))]:
            assert (ours - ref).abs().max() <= 1e-5 * ref.abs().max()
        # and the rotations did change the model
        assert not torch.allclose(orthcr.encode_image(model, merged, images), model.encode_image(images), atol=1e-4)


@settings(max_examples=10, deadline=None)
@given(seed=st.integers(0, 2**31), out=st.integers(2, 24), blocks=st.integers(1, 4), size=st.integers(1, 8))
def test_rotate_weight_is_W0_times_blockdiag_R_transposed(seed, out, blocks, size):
    g = torch.Generator().manual_seed(seed)
    W0 = torch.randn(out, blocks * size, generator=g, dtype=torch.float64)
    R = orthcr.cayley(torch.randn(blocks, size, size, generator=g, dtype=torch.float64))
    assert torch.allclose(orthcr.rotate_weight(W0, R), W0 @ torch.block_diag(*R).T, atol=1e-12)


@settings(max_examples=10, deadline=None)
@given(seed=st.integers(0, 2**31), rows=st.integers(1, 12), blocks=st.integers(1, 4), size=st.integers(1, 8))
def test_rotate_input_is_x_times_blockdiag_R(seed, rows, blocks, size):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(rows, 3, blocks * size, generator=g, dtype=torch.float64)
    R = orthcr.cayley(torch.randn(blocks, size, size, generator=g, dtype=torch.float64))
    assert torch.allclose(orthcr.rotate_input(x, R), x @ torch.block_diag(*R), atol=1e-12)
    W0 = torch.randn(5, blocks * size, generator=g, dtype=torch.float64)  # the identity the speed device rests on
    assert torch.allclose(F.linear(orthcr.rotate_input(x, R), W0), F.linear(x, orthcr.rotate_weight(W0, R)),
                          atol=1e-12)


def pre_hooks(model):
    return sum(len(m._forward_pre_hooks) for m in model.modules())


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("mode, coop", [("random", False), ("attentive", False), ("random", True)])
def test_the_student_device_gives_the_plain_merges_loss_and_gradients(tiny_model, device, mode, coop):
    model = tiny_model.to(device)
    params, images, labels, tokens, zs_text = batch(model)
    params = {k: v.to(device) for k, v in params.items()}
    images, labels, tokens, zs_text = images.to(device), labels.to(device), tokens.to(device), zs_text.to(device)
    adapters = randomize(orthcr.init_adapters(params), 3, 0.2)
    context = None
    if coop:
        context = (0.02 * torch.randn(4, params["token_embedding.weight"].shape[1])).to(device).requires_grad_()
        tokens = orthcr.coop_tokens(["cat", "dog", "car"], n_ctx=4).to(device)
    results = []
    for rotate_inputs in (False, True):
        loss, _ = orthcr.objective(model, params, adapters, images, labels, tokens, zs_text, context=context,
                                   cutout=orthcr.cutout_views(mode, torch.Generator().manual_seed(0)),
                                   transform=orthcr.cayley_fast, rotate_inputs=rotate_inputs)
        trainables = [*adapters.values(), *([context] if coop else [])]
        results.append((loss.detach(), torch.autograd.grad(loss, trainables)))
        assert pre_hooks(model) == 0  # the device's hooks last as long as the student's passes, no longer
    (plain, plain_grads), (device_loss, device_grads) = results
    assert torch.allclose(device_loss, plain, rtol=1e-6, atol=1e-6)
    for a, b in zip(plain_grads, device_grads):
        assert (a - b).norm() <= 1e-4 * a.norm() and a.norm() > 0


def test_the_student_device_rotates_c_fcs_input_and_c_projs_weight(tiny_model):
    params = params_of(tiny_model)
    adapters = randomize(orthcr.init_adapters(params), 4, 0.1)
    with orthcr.student(tiny_model, params, adapters) as merged:
        on_input = {k for k in adapters if torch.equal(merged[k], params[k])}  # kept W0: rotated through the input
        assert all(merged[k].data_ptr() == params[k].data_ptr() for k in on_input)  # W0 itself, not a copy
        assert on_input == {k for k in adapters if k.endswith("mlp.c_fc.weight")}  # tiny: b = 16, out = 256
        assert pre_hooks(tiny_model) == len(on_input)
    assert pre_hooks(tiny_model) == 0
    with pytest.raises(RuntimeError, match="inside"):  # an error inside the student's passes removes them too
        with orthcr.student(tiny_model, params, adapters):
            raise RuntimeError("inside")
    assert pre_hooks(tiny_model) == 0
    with orthcr.student(tiny_model, params, adapters, rotate_inputs=False) as merged:  # the plain merge
        assert all(merged[k] is not params[k] for k in adapters) and pre_hooks(tiny_model) == 0


def test_the_student_device_rotates_only_the_students_own_passes(tiny_model):
    # the hooks are on the model, the parameters are a dict: a pass on other parameters while a student's context
    # is open (the teacher's W0, another student, a plain merge) must run as it would outside
    params, images, labels, tokens, zs_text = batch(tiny_model)
    adapters, other = (randomize(orthcr.init_adapters(params), seed, 0.2) for seed in (3, 4))

    def loss(rotate_inputs):
        return orthcr.objective(tiny_model, params, adapters, images, labels, tokens, zs_text,
                                cutout=orthcr.cutout_views("random", torch.Generator().manual_seed(0)),
                                rotate_inputs=rotate_inputs)[0].detach()

    expected, teacher = loss(False), orthcr.encode_image(tiny_model, params, images)
    with orthcr.student(tiny_model, params, other) as merged:
        assert torch.equal(orthcr.encode_image(tiny_model, params, images), teacher)
        for rotate_inputs in (True, False):  # nested: the objective's teacher and student, inside another student
            torch.testing.assert_close(loss(rotate_inputs), expected, rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(orthcr.encode_image(tiny_model, merged, images),  # and the outer one still
                                   orthcr.encode_image(tiny_model, orthcr.merge(params, other), images),
                                   rtol=1e-5, atol=1e-5)


def test_the_student_device_leaves_no_hook_when_a_key_has_no_module():
    tiny_model = clip_min.random_model("tiny", seed=0)  # its own: a leaked hook would change the shared one's passes
    params = params_of(tiny_model)
    adapters = randomize(orthcr.init_adapters(params), 4, 0.1)
    key = "visual.transformer.resblocks.0.mlp.c_fc.weight"
    ghost = "visual.transformer.resblocks.9.mlp.c_fc.weight"  # sorts after the model's own MLPs
    params[ghost], adapters[ghost] = params[key], adapters[key]
    with pytest.raises(AttributeError):
        with orthcr.student(tiny_model, params, adapters):
            pass
    assert pre_hooks(tiny_model) == 0


def test_the_student_device_removes_its_hooks_on_ctrl_c_inside_the_objective(tiny_model):
    params, images, labels, tokens, zs_text = batch(tiny_model)
    adapters = randomize(orthcr.init_adapters(params), 3, 0.2)

    def interrupt(module, args):
        if pre_hooks(tiny_model) > 1:  # inside the student's passes, the device's hooks on
            raise KeyboardInterrupt

    handle = tiny_model.visual.transformer.resblocks[1].register_forward_pre_hook(interrupt)
    try:
        with pytest.raises(KeyboardInterrupt):
            orthcr.objective(tiny_model, params, adapters, images, labels, tokens, zs_text)
    finally:
        handle.remove()
    assert pre_hooks(tiny_model) == 0


def test_hyperspherical_energy_and_neuron_angles_are_preserved(tiny_model):
    params = params_of(tiny_model)
    adapters = randomize(orthcr.init_adapters(params), 1, 0.5)
    merged = orthcr.merge(params, adapters)
    for key in adapters:
        W0, W = params[key].double(), merged[key].double()
        assert not torch.allclose(W, W0)  # the weights did change
        cos0 = F.normalize(W0, dim=1) @ F.normalize(W0, dim=1).T
        cos = F.normalize(W, dim=1) @ F.normalize(W, dim=1).T
        assert (cos - cos0).abs().max() < 1e-5
        he0, he = orthcr.hyperspherical_energy(W0), orthcr.hyperspherical_energy(W)
        assert abs(he - he0) <= 1e-5 * he0
    # and it is not an invariant of any change: a non-orthogonal perturbation moves it
    W0 = params[next(iter(adapters))]
    assert abs(orthcr.hyperspherical_energy(W0 * torch.linspace(0.5, 2, W0.shape[1]))
               - orthcr.hyperspherical_energy(W0)) > 1e-3


# ----------------------------------------------------------------------------------------------------
# The loss


def batch(tiny_model, seed=0, n=4, classes=3):
    g = torch.Generator().manual_seed(seed)
    images = torch.rand(n, 3, 32, 32, generator=g)
    labels = torch.randint(classes, (n,), generator=g)
    tokens = torch.randint(1, 49000, (classes, 77), generator=g)
    tokens[:, 6] = 49407
    params = params_of(tiny_model)
    zs_text = orthcr.zero_shot_text_features(tiny_model, params, tokens)
    return params, images, labels, tokens, zs_text


def test_kl_terms_are_zero_at_init_and_grad_reaches_only_P(tiny_model):
    params, images, labels, tokens, zs_text = batch(tiny_model)
    adapters = orthcr.init_adapters(params)
    loss, terms = orthcr.objective(tiny_model, params, adapters, images, labels, tokens, zs_text,
                                   cutout=orthcr.cutout_views("random", torch.Generator().manual_seed(0)))
    assert terms["kl"].item() == 0.0 and terms["kl_cutout"].item() == 0.0
    assert graph_leaves(loss) == {id(P) for P in adapters.values()}  # the autograd graph's only leaves
    loss.backward()
    assert all(P.grad is not None and P.grad.abs().sum() > 0 for P in adapters.values())
    assert all(p.grad is None for p in tiny_model.parameters())


def test_with_zero_lambdas_the_loss_is_plain_cross_entropy(tiny_model):
    params, images, labels, tokens, zs_text = batch(tiny_model, seed=1)
    adapters = randomize(orthcr.init_adapters(params), 2, 0.3)
    g = torch.Generator().manual_seed(5)
    loss, terms = orthcr.objective(tiny_model, params, adapters, images, labels, tokens, zs_text,
                                   cutout=orthcr.cutout_views("random", g), lambda1=0.0, lambda2=0.0)
    assert terms["kl"] > 0 and terms["kl_cutout"] > 0  # the regularizer is live, just weighted out
    # recompute CE(clean) + CE(cutout) independently, with the same Cutout draw
    cut = orthcr.cutout(images, torch.Generator().manual_seed(5))
    model = clip_min.build_model({k: v.detach() for k, v in orthcr.merge(params, adapters).items()})
    with torch.no_grad():
        text = F.normalize(model.encode_text(tokens), dim=-1)
        expected = sum(F.cross_entropy(model.logit_scale.exp() * F.normalize(model.encode_image(x), dim=-1) @ text.T,
                                       labels) for x in (clip_min.normalize(images), clip_min.normalize(cut)))
    assert torch.allclose(loss, expected, rtol=1e-5)


def test_kl_is_teacher_as_target():
    g = torch.Generator().manual_seed(0)
    student, teacher = torch.randn(5, 7, generator=g), torch.randn(5, 7, generator=g)
    p0, p = teacher.softmax(-1), student.softmax(-1)
    expected = (p0 * (p0.log() - p.log())).sum(-1).mean()
    assert torch.allclose(orthcr.kl_to_zero_shot(student, teacher), expected, atol=1e-6)
    assert not torch.allclose(orthcr.kl_to_zero_shot(teacher, student), expected, atol=1e-4)


def test_the_mean_reduction_is_batchmean_divided_by_the_classes():
    g = torch.Generator().manual_seed(1)
    student, teacher = torch.randn(6, 7, generator=g, dtype=torch.float64), torch.randn(6, 7, generator=g)
    p0, p = teacher.double().softmax(-1), student.softmax(-1)
    pointwise = p0 * (p0.log() - p.log())  # (N, C)
    batchmean = orthcr.kl_to_zero_shot(student, teacher)
    mean = orthcr.kl_to_zero_shot(student, teacher, reduction="mean")
    assert torch.allclose(batchmean, pointwise.sum(-1).mean().float(), atol=1e-6)  # the true KL
    assert torch.allclose(mean, pointwise.mean().float(), atol=1e-7)  # PromptSRC-style: sum / (N * C)
    assert torch.equal(mean, batchmean / 7)  # exactly /C
    assert orthcr.KL_REDUCTIONS == ("batchmean", "mean")
    with pytest.raises(ValueError, match="'sum'.*batchmean, mean"):
        orthcr.kl_to_zero_shot(student, teacher, reduction="sum")


def test_orthcr_loss_applies_the_reduction_to_both_kl_terms():
    g = torch.Generator().manual_seed(2)
    logits, cut, zs, zs_cut = (torch.randn(4, 5, generator=g) for _ in range(4))
    labels = torch.tensor([0, 3, 1, 4])
    loss, terms = orthcr.orthcr_loss(logits, cut, zs, zs_cut, labels)  # the default: batchmean
    loss_mean, terms_mean = orthcr.orthcr_loss(logits, cut, zs, zs_cut, labels, reduction="mean")
    for term in ("kl", "kl_cutout"):
        assert torch.equal(terms_mean[term], terms[term] / 5)  # C = 5 classes
    for term in ("ce", "ce_cutout"):
        assert torch.equal(terms_mean[term], terms[term])
    kl = orthcr.LAMBDA1 * terms["kl"] + orthcr.LAMBDA2 * terms["kl_cutout"]
    expected = terms["ce"] + terms["ce_cutout"] + kl / 5
    assert torch.allclose(loss_mean, expected, rtol=1e-6) and not torch.allclose(loss_mean, loss, rtol=1e-3)


def test_cayley_runs_once_per_block_size_per_step(tiny_model):
    params, images, labels, tokens, zs_text = batch(tiny_model)
    adapters = orthcr.init_adapters(params)
    calls = []

    def counting(P):
        calls.append(P.shape)
        return orthcr.cayley(P)

    orthcr.objective(tiny_model, params, adapters, images, labels, tokens, zs_text,
                     cutout=orthcr.cutout_views("random", torch.Generator().manual_seed(0)), transform=counting)
    sizes = {P.shape[-1] for P in adapters.values()}
    assert len(calls) == len(sizes)  # batched: one call per block size, covering every layer's blocks
    assert sum(s[0] for s in calls) == sum(P.shape[0] for P in adapters.values())


def test_trim_tokens_is_exact(tiny_model):
    tokens = torch.randint(1, 49000, (3, 77), generator=torch.Generator().manual_seed(0))
    tokens[0, 5], tokens[1, 11], tokens[2, 3] = 49407, 49407, 49407
    tokens[0, 6:] = tokens[1, 12:] = tokens[2, 4:] = 0
    trimmed = orthcr.trim_tokens(tokens)
    assert trimmed.shape == (3, 12)
    with torch.no_grad():
        assert torch.allclose(tiny_model.encode_text(trimmed), tiny_model.encode_text(tokens), atol=1e-6)


# ----------------------------------------------------------------------------------------------------
# Cutout


@settings(max_examples=30, deadline=None)
@given(seed=st.integers(0, 2**31), h=st.integers(4, 40), w=st.integers(4, 40), size=st.integers(1, 20),
       holes=st.integers(1, 3))
def test_cutout_zeroes_clipped_squares_and_nothing_else(seed, h, w, size, holes):
    images = torch.rand(3, 2, h, w, generator=torch.Generator().manual_seed(seed)) + 0.1  # no zeros in the input
    before = images.clone()
    out = orthcr.cutout(images, torch.Generator().manual_seed(seed), holes=holes, size=size)
    assert torch.equal(images, before)  # a copy: the clean batch is untouched
    zero = out == 0
    assert torch.equal(zero[:, 0], zero[:, 1])  # the same hole in every channel
    assert torch.equal(out[~zero], images[~zero])
    for z in zero[:, 0]:
        rows, cols = z.any(1).sum().item(), z.any(0).sum().item()
        assert 1 <= rows and 1 <= cols and rows <= holes * size and cols <= holes * size
        if holes == 1:  # one hole: a rectangle, the square clipped at the border
            assert z.sum() == rows * cols and rows <= size and cols <= size


def test_cutout_is_reproducible_from_its_generator():
    images = torch.rand(4, 3, 32, 32)
    a = orthcr.cutout(images, torch.Generator().manual_seed(3))
    b = orthcr.cutout(images, torch.Generator().manual_seed(3))
    c = orthcr.cutout(images, torch.Generator().manual_seed(4))
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert ((a == 0).sum(dim=(1, 2, 3)) <= 3 * 16 * 16).all()


# ----------------------------------------------------------------------------------------------------
# Export and bad input


def test_merged_weights_reload_into_a_fresh_model(tiny_model):
    params = params_of(tiny_model)
    adapters = randomize(orthcr.init_adapters(params), 3, 0.3)
    exported = orthcr.export_state_dict(params, adapters)
    assert list(exported) == list(params) and not any(v.requires_grad for v in exported.values())
    fresh = clip_min.build_model(exported)
    images = torch.rand(2, 3, 32, 32)
    tokens = torch.randint(1, 49000, (2, 77))
    tokens[:, 4] = 49407
    merged = orthcr.merge(params, adapters)
    with torch.no_grad():
        ours = fresh(images, tokens)[0]
        expected = orthcr.clip_logits(orthcr.encode_image(tiny_model, merged, images),
                                      orthcr.encode_text(tiny_model, merged, tokens), merged["logit_scale"])
        assert torch.allclose(ours, expected, atol=1e-5)
        assert not torch.allclose(ours, tiny_model(images, tokens)[0], atol=1e-3)


def test_exported_weights_load_in_openais_code(tiny_model):
    openai_model = load_openai("model")
    params = params_of(tiny_model)
    adapters = randomize(orthcr.init_adapters(params), 3, 0.3)
    exported = orthcr.export_state_dict(params, adapters)
    reference = openai_model.build_model(dict(exported)).float()  # OpenAI's build_model rounds to fp16 ...
    reference.load_state_dict(exported)  # ... so load the fp32 weights again, with its strict loader
    images = torch.rand(2, 3, 32, 32)
    tokens = torch.randint(1, 49000, (2, 77))
    tokens[:, 4] = 49407
    with torch.no_grad():
        assert torch.allclose(reference(images, tokens)[0], clip_min.build_model(exported)(images, tokens)[0], atol=1e-5)


def test_bad_targets_and_block_counts_name_the_layer(tiny_model):
    params = params_of(tiny_model)
    with pytest.raises(ValueError, match="mlp.c_nope"):
        orthcr.init_adapters(params, targets=("mlp.c_nope",))
    with pytest.raises(ValueError, match=r"transformer\.resblocks\.0\.mlp\.c_fc\.weight.*not divisible by r = 3"):
        orthcr.init_adapters(params, blocks=3)


def test_adapters_from_another_config_are_refused(tiny_model):
    params = params_of(tiny_model)
    adapters = orthcr.init_adapters(params)
    adapters["visual.transformer.resblocks.1.mlp.c_fc.weight"] = torch.zeros(4, 32, 32)  # made for width 128
    with pytest.raises(ValueError, match=r"visual\.transformer\.resblocks\.1\.mlp\.c_fc\.weight.*\(4, 32, 32\).*64"):
        orthcr.export_state_dict(params, adapters)
    with pytest.raises(ValueError, match="matches no 2-D weight"):
        orthcr.check_adapters(params, {"visual.transformer.resblocks.9.mlp.c_fc.weight": torch.zeros(4, 16, 16)})


# ----------------------------------------------------------------------------------------------------
# The loss weights, each pinned to its term


def independent_logits(tiny_model, params, adapters, images, tokens):
    """(student, teacher) logits recomputed with plain models built from the weights, no orthcr.objective."""
    student = clip_min.build_model({k: v.detach() for k, v in orthcr.merge(params, adapters).items()})
    with torch.no_grad():
        out = []
        for model in (student, tiny_model):
            text = F.normalize(model.encode_text(tokens), dim=-1)
            out.append(model.logit_scale.exp() * F.normalize(model.encode_image(clip_min.normalize(images)), dim=-1)
                       @ text.T)
    return out


def test_lambda1_weighs_the_clean_image_kl_and_lambda2_the_cutout_kl(tiny_model):
    params, images, labels, tokens, zs_text = batch(tiny_model, seed=4)
    adapters = randomize(orthcr.init_adapters(params), 5, 0.3)
    student, teacher = independent_logits(tiny_model, params, adapters, images, tokens)
    clean_kl = orthcr.kl_to_zero_shot(student, teacher)  # the clean views alone, no Cutout involved

    def loss(l1, l2):
        return orthcr.objective(tiny_model, params, adapters, images, labels, tokens, zs_text,
                                cutout=orthcr.cutout_views("random", torch.Generator().manual_seed(9)),
                                lambda1=l1, lambda2=l2)

    base, terms = loss(0.0, 0.0)
    assert torch.allclose(terms["kl"], clean_kl, rtol=1e-4)  # "kl" is the clean-image term ...
    assert not torch.allclose(terms["kl_cutout"], clean_kl, rtol=1e-2)  # ... and "kl_cutout" is another one
    assert torch.allclose(loss(1.0, 0.0)[0] - base, clean_kl, rtol=1e-4)  # lambda1 weighs the clean term
    assert torch.allclose(loss(0.0, 1.0)[0] - base, terms["kl_cutout"], rtol=1e-4)  # lambda2 the Cutout term
    assert orthcr.LAMBDA1 == 1.5 and orthcr.LAMBDA2 == 1.0  # the paper's values [AIREV], defaults everywhere


def test_a_merged_dict_that_lacks_a_key_fails_instead_of_using_the_modules_own_weight(tiny_model):
    params = params_of(tiny_model)
    merged = orthcr.merge(params, orthcr.init_adapters(params))
    del merged["visual.transformer.resblocks.0.mlp.c_fc.weight"]
    with pytest.raises(RuntimeError, match="c_fc"):
        orthcr.encode_image(tiny_model, merged, torch.rand(1, 3, 32, 32))


# ----------------------------------------------------------------------------------------------------
# OrthSR (v3): attentive Cutout


def test_the_attentive_hole_is_centred_in_the_patch_most_similar_to_the_class_text():
    g = torch.Generator().manual_seed(0)
    text = torch.randn(3, 8, generator=g)  # each image's own class feature
    patches = torch.randn(3, 16, 8, generator=g)  # a 4 x 4 grid of patch tokens
    best = [5, 0, 15]  # put each image's class text on one known patch
    for i, k in enumerate(best):
        patches[i, k] = 3 * text[i]
    similarity = orthcr.similarity_map(patches, text)
    assert similarity.shape == (3, 4, 4)
    images = torch.rand(3, 3, 64, 64, generator=g) + 0.1  # 16 px patches, no zeros in the input
    for seed in range(20):
        cut = orthcr.attentive_cutout(images, similarity, size=1, generator=torch.Generator().manual_seed(seed))
        for i, k in enumerate(best):
            row, col = divmod(k, 4)
            hole = cut[i, 0] == 0
            assert hole.sum() == 1  # a 1 px hole is its centre ...
            assert hole[row * 16:(row + 1) * 16, col * 16:(col + 1) * 16].any()  # ... inside the chosen patch
            assert torch.equal(cut[i][:, ~hole], images[i][:, ~hole])  # and nothing else is touched


def test_a_larger_attentive_hole_is_clipped_at_the_border_like_a_random_one():
    similarity = torch.zeros(1, 4, 4)
    similarity[0, 0, 3] = 1  # the top-right patch: rows 0..15, columns 48..63
    centres = set()
    for seed in range(40):
        cut = orthcr.attentive_cutout(torch.ones(1, 3, 64, 64), similarity, 32, torch.Generator().manual_seed(seed))
        hole = cut[0, 0] == 0
        rows, cols = hole.any(1).nonzero()[:, 0], hole.any(0).nonzero()[:, 0]
        assert hole.sum() == len(rows) * len(cols)  # a rectangle: the 32 px square clipped ...
        assert rows[0] == 0 and cols[-1] == 63  # ... at the top and right borders
        y, x = rows[-1].item() + 1 - 16, cols[0].item() + 16  # the centre c of rows/cols [c - 16, c + 16)
        assert 0 <= y < 16 and 48 <= x < 64
        centres.add((y, x))
    assert len(centres) > 30  # drawn within the patch, not fixed


def test_the_similarity_map_equals_a_plain_recomputation_from_the_teachers_tokens(tiny_model):
    params, images, labels, tokens, zs_text = batch(tiny_model)
    x = clip_min.normalize(images)
    captured = []
    hook = tiny_model.visual.transformer.register_forward_hook(lambda m, args, out: captured.append(out))
    with torch.no_grad():
        features, patches = orthcr.encode_image(tiny_model, params, x, dense=True)
        assert torch.allclose(features, tiny_model.encode_image(x), atol=1e-6)  # the class token as usual
    hook.remove()
    tokens_out = captured[0][:, 1:]  # (N, grid^2, width): every patch token after the last block
    dense = tiny_model.visual.ln_post(tokens_out) @ tiny_model.visual.proj
    text = zs_text[labels]
    expected = torch.stack([F.cosine_similarity(dense[i], text[i][None], dim=-1) for i in range(len(labels))])
    assert torch.allclose(orthcr.similarity_map(patches, text).flatten(1), expected, atol=1e-6)


def test_random_and_attentive_cutout_give_the_same_loss_when_their_holes_coincide(tiny_model, monkeypatch):
    params, images, labels, tokens, zs_text = batch(tiny_model, seed=2)
    adapters = randomize(orthcr.init_adapters(params), 1, 0.2)
    with torch.no_grad():
        _, patches = orthcr.encode_image(tiny_model, params, clip_min.normalize(images), dense=True)
    attentive_cut = orthcr.attentive_cutout(images, orthcr.similarity_map(patches, zs_text[labels]),
                                            generator=torch.Generator().manual_seed(7))
    loss_attentive, _ = orthcr.objective(tiny_model, params, adapters, images, labels, tokens, zs_text,
                                         cutout=orthcr.cutout_views("attentive", torch.Generator().manual_seed(7)))
    monkeypatch.setattr(orthcr, "cutout", lambda images, *args: attentive_cut)  # random Cutout, same holes
    loss_random, _ = orthcr.objective(tiny_model, params, adapters, images, labels, tokens, zs_text,
                                      cutout=orthcr.cutout_views("random", torch.Generator()))
    assert torch.allclose(loss_attentive, loss_random, rtol=1e-5)


def test_without_cutout_the_loss_is_ce_plus_lambda1_kl_exactly(tiny_model):
    params, images, labels, tokens, zs_text = batch(tiny_model, seed=3)
    adapters = randomize(orthcr.init_adapters(params), 2, 0.3)
    loss, terms = orthcr.objective(tiny_model, params, adapters, images, labels, tokens, zs_text,
                                   cutout=None, lambda1=1.5)
    assert set(terms) == {"ce", "kl"}
    student, teacher = independent_logits(tiny_model, params, adapters, images, tokens)
    expected = F.cross_entropy(student, labels) + 1.5 * orthcr.kl_to_zero_shot(student, teacher)
    assert torch.allclose(loss, expected, rtol=1e-5)


def graph_leaves(loss):
    """id() of every leaf tensor of loss's autograd graph."""
    leaves, stack, seen = set(), [loss.grad_fn], set()
    while stack:
        node = stack.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        if hasattr(node, "variable"):
            leaves.add(id(node.variable))
        stack += [n for n, _ in node.next_functions]
    return leaves


@pytest.mark.parametrize("mode", orthcr.CUTOUT_MODES)
def test_nothing_in_the_teachers_path_receives_gradients(tiny_model, mode):
    params, images, labels, tokens, zs_text = batch(tiny_model)
    adapters = randomize(orthcr.init_adapters(params), 1, 0.1)
    loss, _ = orthcr.objective(tiny_model, params, adapters, images, labels, tokens, zs_text,
                               cutout=orthcr.cutout_views(mode, torch.Generator().manual_seed(0)))
    assert graph_leaves(loss) == {id(P) for P in adapters.values()}


def test_attentive_cutout_draws_only_from_its_generator():
    similarity = torch.randn(6, 4, 4, generator=torch.Generator().manual_seed(0))
    images = torch.ones(6, 3, 64, 64)
    for temperature in (0.5, None):  # sampled patch, and the argmax: both draw the centre
        draw = lambda seed: orthcr.attentive_cutout(images, similarity, 16, torch.Generator().manual_seed(seed),  # noqa
                                                    temperature)
        assert torch.equal(draw(1), draw(1)) and not torch.equal(draw(1), draw(2))
    cold = orthcr.attentive_cutout(images, similarity, 16, torch.Generator().manual_seed(1), 1e-4)
    argmax = orthcr.attentive_cutout(images, similarity, 16, torch.Generator().manual_seed(1))
    assert torch.equal(cold, argmax)  # T -> 0 is the argmax, the same centre offsets drawn first
    with pytest.raises(ValueError, match="seeded torch.Generator"):
        orthcr.attentive_cutout(images, similarity, 16)  # no hidden global randomness


# ----------------------------------------------------------------------------------------------------
# Random and attentive Cutout differ only in where the centre falls (ViT-B/16's grid: 224 px, 14 x 14 patches of 16)


def _axis_law(pixels=224, patch=16, size=16, centres=None):
    """Per centre c on one axis, the hole's span [c - size // 2, c - size // 2 + size) clipped to the image:
    (patches it touches, its length, patches it covers wholly), computed here by hand, independently of orthcr."""
    touched, length, whole = [], [], []
    for c in (range(pixels) if centres is None else centres):
        first, last = max(c - size // 2, 0), min(c - size // 2 + size, pixels) - 1
        touched.append(last // patch - first // patch + 1)
        length.append(last - first + 1)
        whole.append(max((last + 1) // patch - (first + patch - 1) // patch, 0))
    return np.array(touched), np.array(length), np.array(whole)


def exact_law(centres_y=None, centres_x=None, size=16):
    """{patches touched: probability} and the mean clipped area (pixels) of a hole whose centre is uniform over
    centres_y x centres_x (default: every pixel of a 224 px image)."""
    ty, ly, _ = _axis_law(size=size, centres=centres_y)
    tx, lx, _ = _axis_law(size=size, centres=centres_x)
    touched, area = np.outer(ty, tx).ravel(), np.outer(ly, lx).ravel()
    return {k: float(np.mean(touched == k)) for k in (1, 2, 4)}, float(area.mean())


def sampled_law(cut_fn, n=20_000, chunk=2_500):
    """The same two statistics measured on n holes cut by cut_fn(images) in 224 px images (bool, to stay small)."""
    touched, area = [], []
    for _ in range(n // chunk):
        hole = ~cut_fn(torch.ones(chunk, 1, 224, 224, dtype=torch.bool))[:, 0]  # (chunk, 224, 224)
        touched.append(hole.view(chunk, 14, 16, 14, 16).any(4).any(2).sum((1, 2)))  # patches with a hole pixel
        area.append(hole.sum((1, 2)))
    touched, area = torch.cat(touched), torch.cat(area).double()
    return {k: (touched == k).double().mean().item() for k in (1, 2, 4)}, area.mean().item()


# The statistical tolerance: with n = 20,000 holes the standard error of a frequency is at most 0.0035 and that of
# the mean area under 0.15 px, so 0.02 and 1 px are more than 5 standard errors; the draws are seeded, so the test
# is deterministic. The old attentive hole (one whole patch, always) is off by 0.76 and 9 px.
FREQUENCY_TOL, AREA_TOL = 0.02, 1.0


def test_the_exact_law_of_a_16_px_random_hole_is_the_issues_measurement():
    frequencies, area = exact_law()
    assert abs(frequencies[4] - 0.756) < 0.005 and abs(frequencies[2] - 0.23) < 0.006  # issue #19, sampled
    assert abs(frequencies[1] - 0.014) < 0.004 and sum(frequencies.values()) == pytest.approx(1)
    assert abs(area / 224**2 - 0.00493) < 0.00002  # 0.493 % after clipping, against 0.510 % for a whole patch


def test_random_and_attentive_holes_touch_the_same_patches_and_the_same_area():
    frequencies, area = exact_law()
    g_random, g_attentive = torch.Generator().manual_seed(0), torch.Generator().manual_seed(1)
    random = sampled_law(lambda x: orthcr.cutout(x, g_random, size=16))
    uniform_map = torch.zeros(2_500, 14, 14)  # no patch preferred: the patch is uniform, like the centre
    attentive = sampled_law(lambda x: orthcr.attentive_cutout(x, uniform_map, 16, g_attentive, temperature=1.0))
    for measured in (random, attentive):
        assert all(abs(measured[0][k] - frequencies[k]) <= FREQUENCY_TOL for k in frequencies), measured
        assert abs(measured[1] - area) <= AREA_TOL, measured
    assert all(abs(random[0][k] - attentive[0][k]) <= FREQUENCY_TOL for k in frequencies)
    assert abs(random[1] - attentive[1]) <= AREA_TOL


@pytest.mark.parametrize("row, col", [(6, 9), (0, 13)])  # an inner patch, and a corner one
def test_the_argmax_hole_is_a_random_hole_whose_centre_fell_in_the_chosen_patch(row, col):
    # the law of random Cutout given that its centre fell in this patch, by hand; then attentive's, sampled
    frequencies, area = exact_law(range(row * 16, row * 16 + 16), range(col * 16, col * 16 + 16))
    similarity = torch.zeros(2_500, 14, 14)
    similarity[:, row, col] = 1
    g = torch.Generator().manual_seed(2)
    measured = sampled_law(lambda x: orthcr.attentive_cutout(x, similarity, 16, g))
    assert all(abs(measured[0][k] - frequencies[k]) <= FREQUENCY_TOL for k in frequencies), measured
    assert abs(measured[1] - area) <= AREA_TOL, measured


def test_the_attentive_centre_is_uniform_over_the_chosen_patchs_pixels():
    similarity = torch.zeros(12_800, 4, 4)
    similarity[:, 2, 1] = 1  # rows 32..47, columns 16..31 of a 64 px image
    cut = orthcr.attentive_cutout(torch.ones(12_800, 1, 64, 64, dtype=torch.bool), similarity, 1,
                                  torch.Generator().manual_seed(3))
    where = (~cut[:, 0]).flatten(1).nonzero()  # (N, 2): image, flat pixel of the 1 px hole = the centre
    assert torch.equal(where[:, 0], torch.arange(12_800))  # exactly one centre per image
    y, x = where[:, 1] // 64, where[:, 1] % 64
    assert ((32 <= y) & (y < 48) & (16 <= x) & (x < 32)).all()  # always inside the patch
    counts = torch.bincount((y - 32) * 16 + (x - 16), minlength=256).double()  # 50 expected per pixel
    chi_square = ((counts - 50) ** 2 / 50).sum()
    assert chi_square < 400  # uniform: 255 degrees of freedom, mean 255 and sd 23; a fixed centre gives 3e6


def test_the_hole_size_table_in_docs_matches_the_code():
    rows = [line.split("|")[1:-1] for line in (ROOT / "docs" / "cutout.md").read_text().splitlines()
            if re.match(r"\| \d+ \|", line)]
    assert [int(row[0]) for row in rows] == [16, 32, 56, 112]
    for side, share, patches, touched, whole, mean_share, mean_touched, mean_whole in (
            [cell.strip() for cell in row] for row in rows):
        size = int(side)
        assert share == f"{100 * size**2 / 224**2:.2f} %" and patches == f"{size**2 / 16**2:g}"
        # by hand over every centre: the ranges for holes inside the image, the means for a random centre
        t, length, w = _axis_law(size=size)
        inside = np.array([size // 2 <= c <= 224 - size + size // 2 for c in range(224)])
        assert touched == f"{t[inside].min() ** 2}–{t[inside].max() ** 2}"
        assert whole == f"{w[inside].min() ** 2}–{w[inside].max() ** 2}"
        exact = {"share": 100 * np.outer(length, length) / 224**2, "touched": np.outer(t, t), "whole": np.outer(w, w)}
        assert mean_share == f"{exact['share'].mean():.2f} %" and mean_touched == f"{exact['touched'].mean():.2f}"
        assert mean_whole == f"{exact['whole'].mean():.3f}"
        # and orthcr.cutout's holes have those means, within 6 standard errors of 2,000 draws
        g, measured = torch.Generator().manual_seed(size), {"share": [], "touched": [], "whole": []}
        for _ in range(2):
            hole = ~orthcr.cutout(torch.ones(1_000, 1, 224, 224, dtype=torch.bool), g, size=size)[:, 0]
            per_patch = hole.view(1_000, 14, 16, 14, 16).sum((2, 4))  # (N, 14, 14) hole pixels per patch
            measured["share"].append(100 * hole.sum((1, 2)) / 224**2)
            measured["touched"].append((per_patch > 0).sum((1, 2)))
            measured["whole"].append((per_patch == 256).sum((1, 2)))
        for name, values in measured.items():
            mean = torch.cat(values).double().mean().item()
            assert abs(mean - exact[name].mean()) <= 6 * exact[name].std() / 2_000**0.5 + 1e-9, (size, name, mean)


# ----------------------------------------------------------------------------------------------------
# OrthSR (v3) with CoOp's learned context


def test_coop_with_the_context_of_a_photo_of_a_and_P_zero_is_zero_shot_clip(tiny_model):
    params = params_of(tiny_model)
    classes = ["cat", "golden retriever", "sea or lake"]
    context = orthcr.init_context(params, ctx_init="a photo of a")
    assert context.shape == (4, 64)
    coop_tokens = orthcr.coop_tokens(classes, ctx_init="a photo of a")
    merged = orthcr.merge(params, orthcr.init_adapters(params))
    images = clip_min.normalize(torch.rand(4, 3, 32, 32, generator=torch.Generator().manual_seed(0)))
    with torch.no_grad():
        ours = orthcr.clip_logits(orthcr.encode_image(tiny_model, merged, images),
                                  orthcr.encode_text(tiny_model, merged, coop_tokens, context), merged["logit_scale"])
        expected = tiny_model(images, clip_min.tokenize([f"a photo of a {c}." for c in classes]))[0]
    assert (ours - expected).abs().max() <= 1e-6 * expected.abs().max()


def test_coop_prompts_put_the_context_between_sos_and_the_class_tokens(tiny_model):
    params = params_of(tiny_model)
    tokens = orthcr.coop_tokens(["cat", "sea or lake"], n_ctx=3)
    context = torch.randn(3, 64, generator=torch.Generator().manual_seed(0))
    prompts = orthcr.coop_prompts(params["token_embedding.weight"], tokens, context)
    embedded = params["token_embedding.weight"][tokens]
    assert prompts.shape == embedded.shape
    assert torch.equal(prompts[:, 1:4], context.expand(2, 3, 64))  # one context for every class
    assert torch.equal(prompts[:, 0], embedded[:, 0]) and torch.equal(prompts[:, 4:], embedded[:, 4:])
    assert tokens[0, 0] == clip_min.SOT and (tokens[:, 1:4] == clip_min.encode("x")[0]).all()


def test_gradients_reach_the_context_and_the_adapters_and_nothing_else(tiny_model):
    params, images, labels, _, zs_text = batch(tiny_model)
    adapters = randomize(orthcr.init_adapters(params), 1, 0.1)
    context = orthcr.init_context(params, n_ctx=4, generator=torch.Generator().manual_seed(0))
    tokens = orthcr.trim_tokens(orthcr.coop_tokens(["a", "b", "c"], n_ctx=4))
    loss, _ = orthcr.objective(tiny_model, params, adapters, images, labels, tokens, zs_text,
                               context=context,
                               cutout=orthcr.cutout_views("attentive", torch.Generator().manual_seed(0)))
    assert graph_leaves(loss) == {id(P) for P in adapters.values()} | {id(context)}
    loss.backward()
    assert context.grad.abs().sum() > 0 and all(P.grad.abs().sum() > 0 for P in adapters.values())
    assert all(p.grad is None for p in tiny_model.parameters())


def test_coop_adds_n_ctx_times_512_trainable_parameters_on_vit_b16():
    with torch.device("meta"):
        params = dict(clip_min.CLIP(**clip_min.CONFIGS["ViT-B/16"]).state_dict())
    adapters = orthcr.init_adapters(params)
    for n_ctx, init in ((16, None), (4, "a photo of a")):
        context = orthcr.init_context(params, n_ctx, init, torch.Generator().manual_seed(0))
        assert orthcr.count_parameters(adapters, context) == 43_450_368 + n_ctx * 512
