"""The precision policy (issue 10): what defines the method stays fp32 under autocast, and every tensor of a
training step and an evaluation batch lives on the requested device.

CPU bf16 autocast stands in for CUDA's (the same matmul policy: fp32 accumulation, outputs rounded to bf16)."""

import dataclasses

import pytest
import torch

import clip_min
import data
import orthcr
import train
from toolbox import runs
from conftest import make_eurosat_like

CLASSES = ["cat", "dog", "bird", "car", "tree"]


def far_from_zero(params, seed, scale=0.3, blocks=4):
    """Adapters with random P of entries ~0.3: rotations far from the identity."""
    g = torch.Generator().manual_seed(seed)
    adapters = orthcr.init_adapters(params, blocks=blocks)
    with torch.no_grad():
        for P in adapters.values():
            P.copy_(torch.randn(P.shape, generator=g) * scale)
    return adapters


def batch(seed, n=8):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(n, 3, 32, 32, generator=g), torch.randint(len(CLASSES), (n,), generator=g)


@pytest.fixture(scope="module")
def setup(tiny_model):
    params = dict(tiny_model.state_dict())
    tokens = orthcr.trim_tokens(clip_min.tokenize([f"a photo of a {c}." for c in CLASSES]))
    return tiny_model, params, tokens, orthcr.zero_shot_text_features(tiny_model, params, tokens)


@pytest.mark.parametrize("seed", [0, 1])
def test_the_rotation_inside_the_merged_weight_stays_orthogonal_under_bf16_autocast(setup, seed):
    _, params, _, _ = setup
    # 16 blocks make every W0_i tall (out >= 4 b), hence well conditioned: recovering R_i from the fp32 W then
    # loses nothing (with square blocks, fp32's rounding of W alone moves the recovered R by cond(W0_i) x 6e-8)
    adapters = far_from_zero(params, seed, blocks=16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        merged = orthcr.merge(params, adapters)
    for key, P in adapters.items():
        assert merged[key].dtype == torch.float32  # autocast casts it where the tower uses it, as it casts W0
        r, b = P.shape[0], P.shape[-1]
        W0, W = params[key].double(), merged[key].double()
        # W = W0 @ blockdiag(R).T, so block i of W's columns is W0_i @ R_i^T: recover R_i by least squares
        R_t = torch.stack([torch.linalg.lstsq(W0[:, i * b:(i + 1) * b], W[:, i * b:(i + 1) * b]).solution
                           for i in range(r)])
        assert orthcr.orthogonality_error(R_t) <= 1e-5, key  # a bf16 product gave ~3e-3


def test_logits_are_fp32_and_equal_the_fp32_computation_from_the_same_features(setup):
    model, params, tokens, _ = setup
    images, _ = batch(0)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        image_features = orthcr.encode_image(model, params, clip_min.normalize(images))
        text_features = orthcr.encode_text(model, params, tokens)
        logits = orthcr.clip_logits(image_features, text_features, params["logit_scale"])
    assert image_features.dtype == torch.bfloat16  # the towers did run in bf16 ...
    assert logits.dtype == torch.float32  # ... and the classifier did not
    expected = orthcr.clip_logits(image_features.float(), text_features.float(), params["logit_scale"])
    assert torch.equal(logits, expected)


def test_teacher_features_are_kept_in_fp32(setup):
    model, params, tokens, _ = setup
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert orthcr.zero_shot_text_features(model, params, tokens).dtype == torch.float32


# The loss under bf16 autocast against fp32 on the same batch, far from zero. Measured on this tiny model over
# 12 seeds (adapters at scale 0.3, batch 8, 5 classes): at most 0.66 % relative (bf16's unit roundoff is
# 2^-8 = 0.39 % per rounded matmul output; the tower's two blocks compound a few of them). The tolerance is that
# worst case with 2.3x headroom.
LOSS_RTOL = 0.015


@pytest.mark.parametrize("seed", [0, 3, 5])
@pytest.mark.parametrize("cutout", ["random", "attentive"])
def test_the_bf16_loss_is_within_the_measured_tolerance_of_the_fp32_loss(setup, seed, cutout):
    model, params, tokens, teacher_text = setup
    images, labels = batch(seed)
    adapters = far_from_zero(params, seed)

    def loss():
        return orthcr.objective(model, params, adapters, images, labels, tokens, teacher_text,
                                cutout=orthcr.cutout_views(cutout, torch.Generator().manual_seed(seed)))

    with torch.autocast("cpu", dtype=torch.bfloat16):
        low, low_terms = loss()
    full, full_terms = loss()
    assert low.dtype == torch.float32 and all(t.dtype == torch.float32 for t in low_terms.values())
    assert abs(low.item() - full.item()) <= LOSS_RTOL * full.item()


# ----------------------------------------------------------------------------------------------------
# Every tensor on the requested device: torch's meta device checks devices and shapes on any build (adding a
# CPU tensor to a meta tensor raises), without data. What needs data (the token trim, .item(), the finiteness
# checks) runs outside these functions.


def meta_settings(*flags):
    cfg = train.settings_from(train.parse_args(["--device", "cpu", *flags]))
    return dataclasses.replace(cfg, device="meta")


@pytest.mark.parametrize("flags", [[], ["--cutout", "attentive"], ["--cutout", "none"],
                                   ["--prompt", "coop", "--ctx-init", "a photo of a"],
                                   ["--prompt", "coop", "--n-ctx", "4", "--cutout", "attentive"]])
def test_a_training_step_and_an_evaluation_batch_run_on_the_meta_device(tiny_model, flags):
    cfg = meta_settings(*flags)
    params = {k: v.to("meta") for k, v in tiny_model.state_dict().items()}
    adapters, context = train.init_trainables(params, cfg, seed=1)
    assert all(P.is_meta for P in train.trainable_tensors(adapters, context))
    dataset = data.Dataset("toy", CLASSES, "a photo of a {}.")
    tokens, teacher_text = train.class_prompts(tiny_model, params, dataset, cfg)
    images, labels = batch(0)
    loss, terms = orthcr.objective(tiny_model, params, adapters, images.to("meta"), labels.to("meta"), tokens,
                                   teacher_text, context=context,
                                   **train.method_settings(cfg, torch.Generator().manual_seed(0)))
    loss.backward()
    assert loss.is_meta and all(P.grad is not None and P.grad.is_meta for P in train.trainable_tensors(adapters, context))
    merged = orthcr.export_state_dict(params, adapters)
    weights = train.classifier(tiny_model, merged, context, dataset, cfg)
    predictions = train.predict(tiny_model, merged, clip_min.normalize(images).to("meta"), weights, cfg)
    assert predictions.is_meta and predictions.shape == (8,)


@pytest.mark.filterwarnings("ignore:val. 4 classes have fewer")  # the toy dataset's validation set
@pytest.mark.parametrize("flags", [[], ["--cutout", "attentive", "--prompt", "coop", "--n-ctx", "4"]])
def test_train_runs_its_loop_on_the_meta_device(tiny_model, tmp_path, monkeypatch, flags):
    """train() itself, not only the objective: the batches' move to the device, autocast, the grad scaler, AdamW's
    step and the schedule, with every tensor on meta. Only what reads values is stubbed out: the finiteness
    check, the log and progress lines' .item()s and the checkpoint's copy to the CPU."""
    cfg = meta_settings("--epochs", "1", "--batch-size", "4", *flags)
    train_set = data.build_dataset("eurosat", make_eurosat_like(tmp_path / "data"), shots=4, seed=1, subsample="base")
    params = {k: v.to("meta") for k, v in tiny_model.state_dict().items()}
    saved = []
    monkeypatch.setattr(train, "not_finite", lambda *a: None)
    monkeypatch.setattr(runs.Bookkeeping, "log_step", lambda self, *a: None)
    monkeypatch.setattr(runs.Progress, "report", lambda self, *a: None)
    monkeypatch.setattr(runs, "save_checkpoint", lambda folder, cfg, seed, sha, step, total, adapters, context, *a:
                        saved.append((step, total, adapters, context)))
    adapters, context = train.train(tiny_model, params, train_set, cfg, seed=1, folder=tmp_path)
    # 4 shots x 2 base classes = 8 images: 2 steps of 4, each checkpointed at the epoch's end
    assert [(step, total) for step, total, *_ in saved] == [(2, 2)]
    tensors = train.trainable_tensors(adapters, context)
    assert tensors and all(P.is_meta for P in tensors)
    assert (context is not None) == ("coop" in flags)
