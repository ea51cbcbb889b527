"""toolbox/compiled.py: torch.compile of the objective gives eager's loss and gradients (within a stated
tolerance), and the availability check names what is missing. Skips where inductor cannot build here."""

import pytest
import torch

import clip_min
import orthcr
from toolbox import compiled

# compiled kernels reorder and fuse float operations (reductions, exp, the Cayley solve's neighbours): fp32
# rounding, amplified by 24 layers of a random model at most a few hundred times
RTOL, ATOL = 1e-4, 1e-6


def test_compiler_available_names_what_is_missing(monkeypatch):
    monkeypatch.setenv("CXX", "no-such-compiler-xyz")
    assert compiled.compiler_available("cpu") == ("--compile: no C++ compiler found (no-such-compiler-xyz); "
                                                  "inductor's CPU backend needs one")
    with pytest.raises(RuntimeError, match="no C\\+\\+ compiler found"):
        compiled.compile_objective(orthcr.objective, "cpu")


def run(objective, model, params, adapters, images, labels, tokens, zs_text):
    loss, _ = objective(model, params, adapters, images, labels, tokens, zs_text,
                        cutout=orthcr.cutout_views("random", torch.Generator().manual_seed(0)),
                        transform=orthcr.cayley_fast)
    return loss.detach(), torch.autograd.grad(loss, list(adapters.values()))


@pytest.mark.parametrize("activation", list(clip_min.ACTIVATIONS))
def test_compiled_objective_equals_eager(activation):
    why = compiled.compiler_available("cpu")
    if why is not None:
        pytest.skip(why)
    torch.manual_seed(0)
    model = clip_min.random_model("tiny", seed=0, activation=activation).requires_grad_(False)
    params = dict(model.state_dict())
    adapters = orthcr.init_adapters(params, blocks=4)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():  # rotations away from the identity, so the gradients are not those of R = I alone
        for P in adapters.values():
            P.copy_(0.05 * torch.randn(P.shape, generator=g))
    images, labels = torch.rand(4, 3, 32, 32, generator=g), torch.tensor([0, 1, 2, 1])
    tokens = orthcr.trim_tokens(clip_min.tokenize(["a photo of a cat.", "a dog", "a red car"]))
    zs_text = orthcr.zero_shot_text_features(model, params, tokens)
    args = (model, params, adapters, images, labels, tokens, zs_text)
    eager_loss, eager_grads = run(orthcr.objective, *args)
    try:
        fn = compiled.compile_objective(orthcr.objective, "cpu")
        loss, grads = run(fn, *args)
    except Exception as e:  # an inductor that cannot build here (headers, linker): skip, naming the cause
        if "CppCompileError" in type(e).__name__ or "InductorError" in type(e).__name__:
            pytest.skip(f"inductor cannot build here: {str(e).splitlines()[0]}")
        raise
    torch.testing.assert_close(loss, eager_loss, rtol=RTOL, atol=ATOL)
    for key, a, b in zip(adapters, grads, eager_grads):
        torch.testing.assert_close(a, b, rtol=RTOL, atol=ATOL * max(1.0, b.abs().max().item()), msg=key)
    assert max(g.abs().max() for g in eager_grads) > 0  # the comparison is not of zeros
