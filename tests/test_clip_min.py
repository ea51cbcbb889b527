"""clip_min computes what OpenAI's CLIP code computes: fixture parity, loading, strictness, safety, tokenizer,
preprocessing. Live parity tests against OpenAI's code run where it is importable (see conftest.load_openai)."""

import json
import math
import os
import pickle
import struct
import tracemalloc
import warnings
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils._python_dispatch import TorchDispatchMode

import clip_min
from toolbox import checkpoints, downloads
from conftest import full_disk, load_openai, rewrite_zip, sha256

FIXTURES = Path(__file__).resolve().parent / "fixtures"
ARCHIVE, STATE = FIXTURES / "tiny_clip.jit.pt", FIXTURES / "tiny_clip.state.pt"


def unit(x):
    return x / x.norm(dim=-1, keepdim=True)


@pytest.fixture(scope="module")
def outputs():
    return torch.load(FIXTURES / "tiny_clip_outputs.pt", weights_only=True)


# ----------------------------------------------------------------------------------------------------
# Model parity with OpenAI's outputs (fixtures made by tests/make_fixtures.py)


@pytest.mark.parametrize("path", [ARCHIVE, STATE], ids=["torchscript", "state_dict"])
def test_fixture_parity(path, outputs):
    model = clip_min.load(path)
    assert not model.training and model.dtype == torch.float32
    with torch.no_grad():
        image_features = model.encode_image(outputs["image"])
        text_features = model.encode_text(outputs["text"])
        logits_per_image, logits_per_text = model(outputs["image"], outputs["text"])
    assert (unit(image_features) - unit(outputs["image_features"])).abs().max() <= 1e-5
    assert (unit(text_features) - unit(outputs["text_features"])).abs().max() <= 1e-5
    torch.testing.assert_close(logits_per_image, outputs["logits_per_image"], rtol=0, atol=1e-4)
    torch.testing.assert_close(logits_per_text, outputs["logits_per_text"], rtol=0, atol=1e-4)


def test_archive_and_state_dict_hold_the_same_weights():
    archive, state = clip_min.read_state_dict(ARCHIVE), clip_min.read_state_dict(STATE)
    # the archive carries exactly the three extra tensors of OpenAI's published file
    assert set(archive) - set(state) == set(clip_min.ARCHIVE_EXTRAS)
    assert archive["vocab_size"].item() == state["token_embedding.weight"].shape[0]
    assert archive["visual.conv1.weight"].dtype == torch.float16  # fp16 storage, like the published file
    for k, v in state.items():
        assert torch.equal(archive[k], v), k


def test_archive_is_read_without_torch_jit_load(monkeypatch, outputs):
    def refuse(*args, **kwargs):
        raise AssertionError("torch.jit.load must not be used")

    expected = clip_min.load(STATE)
    monkeypatch.setattr(torch.jit, "load", refuse)
    monkeypatch.setattr(torch, "load", refuse)  # the archive path needs neither
    model = clip_min.load(ARCHIVE)
    with torch.no_grad():
        assert torch.equal(model.encode_image(outputs["image"]), expected.encode_image(outputs["image"]))


# ----------------------------------------------------------------------------------------------------
# Strict loading: every bad input is one clear error naming the file


def saved(tmp_path, name, obj):
    torch.save(obj, tmp_path / name)
    return tmp_path / name


@pytest.mark.parametrize("change, problem", [
    (lambda sd: sd.pop("visual.ln_post.bias"), "missing keys ['visual.ln_post.bias']"),
    (lambda sd: sd.update(extra=torch.zeros(1)), "unexpected keys ['extra']"),
    (lambda sd: sd.update({"ln_final.bias": torch.zeros(63)}), "ln_final.bias: expected (64,), got (63,)"),
    (lambda sd: sd.pop("visual.proj"), "not a ViT CLIP state dict"),
    (lambda sd: sd.pop("token_embedding.weight"), "missing tensor 'token_embedding.weight'"),
])
def test_strict_loading_errors(tmp_path, change, problem):
    state = clip_min.read_state_dict(STATE)
    change(state)
    path = saved(tmp_path, "bad.pt", state)
    with pytest.raises(ValueError) as e:
        clip_min.load(path)
    assert str(path) in str(e.value) and problem in str(e.value)


def test_extra_tensor_in_archive_is_rejected(tmp_path):
    """Only the three named extras are dropped: any other stray tensor in an archive is an error."""
    with zipfile.ZipFile(ARCHIVE) as z:
        top = z.namelist()[0].split("/")[0]
        data = z.read(f"{top}/data.pkl")
    patched = data.replace(b"vocab_size", b"vocab_sizf")  # same length: a stray tensor with another name
    path = rewrite_zip(ARCHIVE, tmp_path / "stray.pt", replace={f"{top}/data.pkl": patched})
    with pytest.raises(ValueError, match="unexpected keys \\['vocab_sizf'\\]") as e:
        clip_min.load(path)
    assert str(path) in str(e.value)


@pytest.mark.parametrize("make, problem", [
    (lambda p: p.write_text("hello, I am not a checkpoint"), "not a CLIP checkpoint"),
    (lambda p: p.write_bytes(ARCHIVE.read_bytes()[:len(ARCHIVE.read_bytes()) // 2]), "truncated or corrupt"),
    (lambda p: p.write_bytes(STATE.read_bytes()[:len(STATE.read_bytes()) // 2]), "truncated or corrupt"),
    (lambda p: torch.save([torch.zeros(2)], p), "expected a dict of tensors"),
    (lambda p: rewrite_zip(ARCHIVE, p, drop={"tiny_clip.jit/data/3"}), "data/3"),
])
def test_not_a_checkpoint(tmp_path, make, problem):
    path = tmp_path / "file.pt"
    make(path)
    with pytest.raises(ValueError, match=problem) as e:
        clip_min.load(path)
    assert str(path) in str(e.value)


def test_unknown_name_or_missing_file():
    with pytest.raises(FileNotFoundError, match="ViT-B/16"):  # the message lists the known names
        clip_min.load("ViT-Q/99")
    with pytest.raises(FileNotFoundError, match="/nonexistent/clip.pt"):
        clip_min.load("/nonexistent/clip.pt")


# ----------------------------------------------------------------------------------------------------
# Downloads, against a local HTTP server


def assert_clean_failure(error, url, path):
    assert url in str(error.value) and str(path) in str(error.value)
    assert not path.exists()
    assert [p.name for p in path.parent.iterdir()] == []  # no temporary file left behind


def test_download_success_and_cache(server, tmp_path):
    data = os.urandom(3 << 20)
    server["files"]["/f.bin"] = data
    url, path = server["url"] + "/f.bin", tmp_path / "cache" / "f.bin"
    assert downloads.download(url, path, sha256=sha256(data)) == path and path.read_bytes() == data
    assert downloads.download(url, path, sha256=sha256(data)) == path
    assert server["requests"] == ["/f.bin"]  # the cached file was reused
    path.write_bytes(b"stale")
    downloads.download(url, path, sha256=sha256(data))
    assert server["requests"] == ["/f.bin"] * 2 and path.read_bytes() == data  # wrong checksum: fetched again
    assert sorted(p.name for p in path.parent.iterdir()) == ["f.bin"]


@pytest.mark.parametrize("route, expected", [
    ("/404", "404"), ("/500", "500"), ("/drop/1000", "connection closed after 1000 of 2000 bytes"),
    ("/f.bin", "checksum mismatch"),
])
def test_download_failures_leave_nothing(server, tmp_path, route, expected):
    server["files"]["/f.bin"] = b"payload"
    url, path = server["url"] + route, tmp_path / "f.bin"
    with pytest.raises(RuntimeError, match=expected) as e:
        downloads.download(url, path, sha256=sha256(b"something else"))
    assert_clean_failure(e, url, path)


def test_download_full_disk_then_rerun(server, tmp_path, monkeypatch):
    data = os.urandom(100_000)
    server["files"]["/f.bin"] = data
    url, path = server["url"] + "/f.bin", tmp_path / "f.bin"
    full_disk(monkeypatch)
    with pytest.raises(RuntimeError, match="No space left on device") as e:
        downloads.download(url, path, sha256=sha256(data))
    assert_clean_failure(e, url, path)
    monkeypatch.undo()
    assert downloads.download(url, path, sha256=sha256(data)).read_bytes() == data


def test_load_by_name_end_to_end(server, tmp_path, monkeypatch, outputs):
    data = ARCHIVE.read_bytes()
    digest = sha256(data)
    server["files"][f"/clip/models/{digest}/ViT-B-16.pt"] = data
    monkeypatch.setattr(clip_min, "MODELS", {"ViT-B/16": f"{server['url']}/clip/models/{digest}/ViT-B-16.pt"})
    model = clip_min.load("ViT-B/16", download_root=tmp_path)
    assert (tmp_path / "ViT-B-16.pt").read_bytes() == data
    assert clip_min.checkpoint("ViT-B/16", download_root=tmp_path) == (tmp_path / "ViT-B-16.pt", digest)
    assert clip_min.checkpoint(tmp_path / "ViT-B-16.pt") == (tmp_path / "ViT-B-16.pt", digest)
    assert len(server["requests"]) == 1
    with torch.no_grad():
        assert (unit(model.encode_image(outputs["image"])) - unit(outputs["image_features"])).abs().max() <= 1e-5


def test_model_table_sha256_is_the_path_component():
    # load() verifies each download against this path component: a wrong one would refuse OpenAI's real file,
    # so the ViT-B/16 entry is pinned to the SHA-256 OpenAI's own clip package checks
    assert set(clip_min.MODELS) == {"ViT-B/32", "ViT-B/16", "ViT-L/14", "ViT-L/14@336px"}
    url = clip_min.MODELS["ViT-B/16"]
    assert url.split("/")[-2] == "5806e77cd80f8b59890b7e101eabd078d9fb84e6937f9e85e4ecb61988df416f"
    assert all(len(u.split("/")[-2]) == 64 for u in clip_min.MODELS.values())


# ----------------------------------------------------------------------------------------------------
# Tokenizer


@pytest.fixture(scope="module")
def corpus():
    """Texts and OpenAI's ids for them, committed by tests/make_fixtures.py."""
    return json.loads((FIXTURES / "tokens.json").read_text())


def openai_style_tokens(ids, context_length=77):
    """[SOT] + ids + [EOT], cut to the context with EOT last, zero-padded (OpenAI's clip.tokenize, truncate=True)."""
    tokens = [49406] + ids + [49407]
    if len(tokens) > context_length:
        tokens = tokens[:context_length - 1] + [49407]
    return tokens + [0] * (context_length - len(tokens))


def test_tokenizer_fixture_parity(corpus):
    assert sum(corpus["benchmarks"].values()) >= 1000 + 101 + 100 + 397  # ImageNet, Food101, Aircraft, SUN397
    texts, ids = zip(*corpus["texts_and_ids"])
    assert len(texts) > 3000  # class names, prompts, make_fixtures.PIECES and random texts
    mismatches = [t for t, expected in zip(texts, ids) if clip_min.encode(t) != expected]
    assert mismatches == []
    expected = torch.tensor([openai_style_tokens(i) for i in ids], dtype=torch.int32)
    assert torch.equal(clip_min.tokenize(texts, truncate=True), expected)


def test_tokenize_shape_and_special_tokens():
    # 49,408 rows of the checkpoints' token embedding; EOT the largest id, since the text tower pools at argmax
    vocabulary, ranks = clip_min.vocabulary()
    assert len(vocabulary) == 49408 and len(ranks) == 48894
    assert vocabulary["<|startoftext|>"] == 49406 and vocabulary["<|endoftext|>"] == 49407 == max(vocabulary.values())
    tokens = clip_min.tokenize(["a photo of a cat.", ""])
    assert tokens.shape == (2, 77) and tokens.dtype == torch.int32
    assert tokens[1, :3].tolist() == [49406, 49407, 0]
    assert tokens[0, 0] == 49406 and tokens[0].argmax() == (tokens[0] != 0).sum() - 1  # EOT ends the text
    assert clip_min.tokenize("a cat", context_length=5).shape == (1, 5)


def test_tokenize_overflow():
    long = "word " * 100
    with pytest.raises(RuntimeError, match="context length 77"):
        clip_min.tokenize(["short", long])
    tokens = clip_min.tokenize(long, truncate=True)[0]
    assert tokens[-1] == 49407 and (tokens != 0).all()
    assert clip_min.tokenize("word " * 75).shape == (1, 77)  # exactly 77 with SOT and EOT: fits


def test_pretokenizer_uses_unicode_categories():
    # Python's re counts '²' and '½' as word characters; CLIP's pattern splits every number character alone
    assert list(clip_min._pretokenize("x²½ab12")) == ["x", "²", "½", "ab", "1", "2"]
    assert list(clip_min._pretokenize("it's they'll ''s")) == ["it", "'s", "they", "'ll", "''", "s"]
    # a letter Python 3.11's Unicode 14 doesn't know (Kawi, Unicode 15) is a letter in OpenAI's `regex` module
    assert list(clip_min._pretokenize("a\U00011f04b!")) == ["a\U00011f04b", "!"]


# OpenAI's cleaning of each text (ftfy.fix_text, html.unescape twice, whitespace, lower case), as ftfy 6.3.1 does it
@pytest.mark.parametrize("text, cleaned", [
    ("ＬＯＵＤ　ＮＯＩＳＥＳ １２３", "loud noises 123"),  # full width to ASCII, ideographic space to space
    ("ｶﾞｰﾄﾞ", "ガード"),  # half-width katakana; the voiced sound mark is composed by NFC
    ("ﬁne ﬂour ﬃ Ĳssel ǅ ﬅ", "fine flour ffi ijssel dž ſt"),  # Latin ligatures and digraphs ('ﬅ': 'ſt', not 'st')
    ("\ufeffbom\u206a and\x00 nul\x7f", "bom and nul"),  # BOM, deprecated format and C0 controls removed...
    ("zero\u200bwidth\u200d", "zero\u200bwidth\u200d"),  # ...zero-width space and joiners kept
    ("\x1b[1;31mred\x1b[0m", "red"),  # terminal escapes removed...
    ("\x1b\x01[2m", "[2m"), ("\x1b［２m", ""),  # ...before control characters, after full-width forms
    ("\x93quoted\x94 \x80 \x81", '"quoted" € \x81'),  # C1 controls as Windows-1252, then quotes uncurled
    ("it\u2019s \u0149", "it's 'n"),  # 'ŉ' is 'ʼn', whose apostrophe is straightened too
    ("\ud83d\udca9 \udca9", "💩 \ufffd"),  # a surrogate pair joined, a lone surrogate replaced
    ("&EACUTE; &COPYSR;", "é ©sr;"),  # ftfy's all-caps entities; html.unescape reads '&COPY' without ';'
    ("&amp;amp;amp;", "&"),  # ftfy unescapes until nothing changes...
    ("< &amp;amp;amp;", "< &amp;"),  # ...unless the text holds a '<': then only html.unescape, twice
    ("&amp;amp;amp;\n<b>\n&amp;amp;amp;", "& <b> &amp;"),  # from the first line holding a '<' on
    ("&#xFB01; &amp;#xFB01;", "fi fi"), ("< &#xFB01;", "< ﬁ"),  # what ftfy unescapes it fixes, not html.unescape
    ("e\u0301", "é"), ("a\r\nb\u2028c", "a b c"),
])
def test_clean(text, cleaned):
    assert clip_min.clean(text) == cleaned


def test_pretokenizer_classes_match_openais_pattern_on_every_code_point():
    """Each code point is a letter, a number, whitespace or other exactly where OpenAI's case-insensitive `regex`
    classes say so (only 'ͅ', a combining mark that case-folds to a letter, is in none and skipped)."""
    regex = pytest.importorskip("regex")
    text = "".join(chr(c) for c in range(0x110000) if not 0xD800 <= c < 0xE000)  # surrogates are fixed before
    ours = [clip_min._char_class(c) for c in text]
    for kind, pattern in [("L", r"[\p{L}]+"), ("N", r"[\p{N}]+"), ("P", r"[^\s\p{L}\p{N}]+")]:
        expected = "".join(regex.findall(pattern, text, regex.IGNORECASE))
        assert "".join(c for c, k in zip(text, ours) if k == kind) == expected, kind


def test_tokenizer_live_parity_wide_corpus(corpus):
    """OpenAI's ids on random texts of every kind (make_fixtures.random_corpus) where ftfy's mojibake repair
    doesn't act; its pre-tokenizer split on the cleaned texts too."""
    simple_tokenizer = load_openai("simple_tokenizer")
    import ftfy
    import regex
    from make_fixtures import PROMPTS, mojibake_free, random_corpus

    texts = random_corpus(2500, seed=4) + PROMPTS + [t for t, _ in corpus["texts_and_ids"][:500]]
    kept = [t for t in texts if mojibake_free(t, ftfy)]
    assert len(kept) > 0.99 * len(texts)  # the comparison covers nearly all of the corpus
    openai = simple_tokenizer.SimpleTokenizer(str(clip_min.VOCAB_FILE))
    cleaned = [clip_min.clean(t) for t in kept]
    assert [t for t in cleaned if list(clip_min._pretokenize(t)) != regex.findall(openai.pat, t)] == []
    mismatches = [t for t in kept if clip_min.encode(t) != openai.encode(t)]
    assert mismatches == []
    expected = torch.tensor([openai_style_tokens(openai.encode(t)) for t in kept], dtype=torch.int32)
    assert torch.equal(clip_min.tokenize(kept, truncate=True), expected)


def test_vocab_file_is_openais():
    d = Path(load_openai("model").__file__).parent
    assert clip_min.VOCAB_FILE.read_bytes() == (d / "bpe_simple_vocab_16e6.txt.gz").read_bytes()


# ----------------------------------------------------------------------------------------------------
# Preprocessing, against a PIL + numpy reference of OpenAI's torchvision pipeline


def reference_preprocess(image, n_px=224):
    """Resize(n_px, BICUBIC), CenterCrop(n_px), RGB, ToTensor, Normalize, written with PIL and numpy."""
    w, h = image.size
    if w <= h:
        size = (n_px, int(n_px * h / w))  # torchvision truncates the long side
    else:
        size = (int(n_px * w / h), n_px)
    if size != (w, h):
        image = image.resize(size, resample=Image.Resampling.BICUBIC)
    w, h = image.size
    top, left = int(round((h - n_px) / 2.0)), int(round((w - n_px) / 2.0))
    image = image.crop((left, top, left + n_px, top + n_px)).convert("RGB")
    x = np.asarray(image, dtype=np.uint8).astype(np.float32) / np.float32(255)  # (H, W, 3)
    mean = np.array([0.48145466, 0.4578275, 0.40821073], dtype=np.float32)
    std = np.array([0.26862954, 0.26130258, 0.27577711], dtype=np.float32)
    return torch.from_numpy(((x - mean) / std).transpose(2, 0, 1).copy())  # (3, H, W)


def random_image(w, h, mode, seed=0):
    rng = np.random.default_rng(seed)
    channels = {"RGB": 3, "RGBA": 4, "L": None, "P": None}[mode]
    shape = (h, w, channels) if channels else (h, w)
    image = Image.fromarray(rng.integers(0, 256, shape, dtype=np.uint8), "L" if mode == "P" else mode)
    return image.convert("P") if mode == "P" else image


@pytest.mark.parametrize("w, h, mode", [
    (224, 224, "RGB"), (640, 480, "RGB"), (333, 500, "RGB"), (225, 300, "RGB"), (227, 227, "RGB"),
    (64, 64, "RGB"), (100, 37, "RGB"), (300, 301, "L"), (256, 320, "RGBA"), (250, 260, "P"),
])
def test_preprocess_matches_reference(w, h, mode):
    image = random_image(w, h, mode)
    ours = clip_min.preprocess(image)
    assert ours.shape == (3, 224, 224) and ours.dtype == torch.float32
    assert torch.equal(ours, reference_preprocess(image))


def test_resize_and_crop_rounding():
    assert clip_min.resize(Image.new("RGB", (300, 200))).size == (336, 224)
    assert clip_min.resize(Image.new("RGB", (333, 500))).size == (224, 336)  # 336.33 truncated
    # offsets (227 - 224) / 2 = 1.5 -> 2 and (225 - 224) / 2 = 0.5 -> 0: round half to even, as torchvision
    columns = Image.fromarray(np.tile(np.arange(227, dtype=np.uint8), (225, 1)), "L")  # pixel value = column
    cropped = np.asarray(clip_min.center_crop(columns))
    assert cropped[0, 0] == 2 and cropped.shape == (224, 224)
    rows = Image.fromarray(np.tile(np.arange(225, dtype=np.uint8)[:, None], (1, 227)), "L")  # value = row
    assert np.asarray(clip_min.center_crop(rows))[0, 0] == 0


def test_to_tensor_and_normalize():
    image = random_image(40, 30, "RGB")
    x = clip_min.to_tensor(image)
    assert x.shape == (3, 30, 40) and x.dtype == torch.float32 and 0 <= x.min() and x.max() <= 1
    assert torch.equal(x[:, 5, 7] * 255, torch.tensor(np.asarray(image)[5, 7], dtype=torch.float32))
    batch = torch.stack([x, x.flip(-1)])
    assert torch.equal(clip_min.normalize(batch)[1], clip_min.normalize(x.flip(-1)))
    mean = torch.tensor(clip_min.MEAN).view(3, 1, 1).expand(3, 2, 2)
    assert clip_min.normalize(mean).abs().max() == 0
    with pytest.raises(ValueError, match="expected images of shape"):
        clip_min.normalize(torch.zeros(2, 4, 8, 8))


# ----------------------------------------------------------------------------------------------------
# Live parity on a full-size ViT-B/16 with random official-init weights (needs OpenAI's model.py)


@pytest.fixture(scope="module")
def live_b16(tmp_path_factory):
    oa = load_openai("model")
    torch.manual_seed(0)
    heads = dict(clip_min.CONFIGS["ViT-B/16"], transformer_heads=512 // 64)
    model = oa.CLIP(**heads).eval()
    oa.convert_weights(model)  # fp16 storage, as OpenAI publishes
    state_dict = {k: v.clone() for k, v in model.state_dict().items()}
    folder = tmp_path_factory.mktemp("b16")
    torch.save(state_dict, folder / "state.pt")
    for name, value in [("input_resolution", 224), ("context_length", 77), ("vocab_size", 49408)]:
        model.__dict__.pop(name, None)
        model.register_buffer(name, torch.tensor(value))
    image = torch.randn(2, 3, 224, 224, generator=torch.Generator().manual_seed(1))
    text = clip_min.tokenize(["a photo of a dog.", "a centered satellite photo of annual crop land.",
                              "don't “panic” &amp; carry a towel 42"])
    with warnings.catch_warnings():  # torch.jit's deprecation and tracer warnings: expected here
        warnings.simplefilter("ignore")
        traced = torch.jit.trace(model, (image[:1].half(), text[:1]), check_trace=False)
        torch.jit.save(traced, folder / "archive.pt")
    del model, traced
    reference = oa.build_model(dict(state_dict)).float().eval()
    with torch.no_grad():
        expected = dict(image=reference.encode_image(image), text=reference.encode_text(text),
                        logits=reference(image, text)[0])
    return folder, image, text, expected


@pytest.mark.parametrize("file", ["archive.pt", "state.pt"])
def test_live_b16_parity(live_b16, file):
    folder, image, text, expected = live_b16
    model = clip_min.load(folder / file)
    assert len(model.state_dict()) == 302
    with torch.no_grad():
        image_features, text_features = model.encode_image(image), model.encode_text(text)
        logits = model(image, text)[0]
    assert (unit(image_features) - unit(expected["image"])).abs().max() <= 1e-5
    assert (unit(text_features) - unit(expected["text"])).abs().max() <= 1e-5
    torch.testing.assert_close(logits, expected["logits"], rtol=0, atol=1e-3)


PLAIN_ACTIVATIONS = {  # the formulas written out, independent of clip_min's
    "quick_gelu": lambda h: h * torch.sigmoid(1.702 * h),
    "gelu": lambda h: 0.5 * h * (1 + torch.erf(h / 2 ** 0.5)),
}


def random_mlp(activation, dtype, seed=1, width=8):
    g = torch.Generator().manual_seed(seed)
    mlp = clip_min.MLP(width, activation).to(dtype)
    with torch.no_grad():
        for p in mlp.parameters():
            p.copy_(torch.randn(p.shape, generator=g, dtype=dtype))
    return mlp, g


@pytest.mark.parametrize("activation", list(clip_min.ACTIVATIONS))
@pytest.mark.parametrize("shape", [(3, 8), (2, 5, 8)])
def test_mlp_recompute_device_gradcheck(activation, shape):
    # the MLP's recompute device has a hand-written backward: finite differences in fp64, inputs and parameters
    mlp, g = random_mlp(activation, torch.float64)
    assert mlp.recompute_activation
    names = [name for name, _ in mlp.named_parameters()]
    x = torch.randn(shape, generator=g, dtype=torch.float64, requires_grad=True)
    params = [p.detach().clone().requires_grad_() for p in mlp.parameters()]

    def run(x, *params):
        return torch.func.functional_call(mlp, dict(zip(names, params)), (x,))

    assert torch.autograd.gradcheck(run, (x, *params))


@pytest.mark.parametrize("activation", list(clip_min.ACTIVATIONS))
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_mlp_speed_device_equals_its_plain_formula(activation, dtype):
    # MLP.forward's recompute device against c_proj(activation(c_fc(x))): outputs and gradients, for each activation
    mlp, g = random_mlp(activation, dtype)
    x = torch.randn(2, 5, 8, generator=g, dtype=dtype, requires_grad=True)
    upstream = torch.randn(2, 5, 8, generator=g, dtype=dtype)
    results = []
    for fused in (True, False):
        mlp.recompute_activation = fused
        out = mlp(x)
        results.append((out, *torch.autograd.grad((out * upstream).sum(), (x, *mlp.parameters()))))
    tol = 1e-12 if dtype == torch.float64 else 1e-5
    for fused, plain in zip(*results):
        assert (fused - plain).abs().max() <= tol * plain.abs().max()
    with torch.no_grad():  # and the plain formula is the written-out activation between the two linears
        h = mlp.c_fc(x)
        for fused in (True, False):
            mlp.recompute_activation = fused
            assert torch.allclose(mlp(x), mlp.c_proj(PLAIN_ACTIVATIONS[activation](h)), atol=tol)


def test_activations_differ_and_reach_every_block():
    # the two activations give different features, and a model built with one uses it in every MLP of both towers
    images = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    state_dict = clip_min.random_model("tiny", seed=0).state_dict()
    features = {}
    for activation in clip_min.ACTIVATIONS:
        model = clip_min.build_model(state_dict, activation=activation)
        assert model.activation == activation
        mlps = [m for m in model.modules() if isinstance(m, clip_min.MLP)]
        assert len(mlps) == 4 and {m.activation for m in mlps} == {activation}
        assert model.state_dict().keys() == state_dict.keys()
        with torch.no_grad():
            features[activation] = model.encode_image(images)
        random = clip_min.random_model("tiny", seed=0, activation=activation)
        assert {m.activation for m in random.modules() if isinstance(m, clip_min.MLP)} == {activation}
    assert clip_min.random_model("tiny").activation == "quick_gelu"  # OpenAI's, the default
    assert not torch.allclose(features["quick_gelu"], features["gelu"], atol=1e-3)
    with pytest.raises(ValueError, match="activation 'relu': expected one of quick_gelu, gelu"):
        clip_min.build_model(state_dict, activation="relu")


class OpsOn(TorchDispatchMode):
    """The aten ops dispatched while active whose output has `numel` elements (the activations under test)."""

    def __init__(self, numel):
        super().__init__()
        self.numel, self.ops = numel, []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        first = out[0] if isinstance(out, (tuple, list)) and out else out  # native_layer_norm: (y, mean, rstd)
        if isinstance(first, torch.Tensor) and first.numel() == self.numel:
            self.ops.append(func.overloadpacket.__name__)
        return out


@pytest.mark.parametrize("activation", list(clip_min.ACTIVATIONS))
def test_mlp_speed_device_touches_the_wide_activation_three_times(activation):
    # issue #22: the plain quick_gelu is 3 elementwise passes over the (tokens, 4 width) tensor (mul, sigmoid,
    # mul) and its autograd more; the device folds 1.702 into the weights: one pass forward (f), two backward
    # (f recomputed for c_proj's weight gradient, f's fused backward), besides the matmuls that produce them
    mlp, g = random_mlp(activation, torch.float32, width=16)
    x = torch.randn(3, 5, 16, generator=g, requires_grad=True)
    with OpsOn(3 * 5 * 64) as forward:
        out = mlp(x)
    with OpsOn(3 * 5 * 64) as backward:
        out.sum().backward()
    f = {"quick_gelu": "silu", "gelu": "gelu"}[activation]
    elementwise = lambda ops: [op for op in ops if op not in ("addmm", "mm", "view", "_unsafe_view", "t")]
    assert elementwise(forward.ops) == [f]
    assert sorted(elementwise(backward.ops)) == sorted([f, f + "_backward"])


class Copies(TorchDispatchMode):
    """The shapes of every copy made to change a layout (clone, copy_, contiguous's clone) while active."""

    def __init__(self):
        super().__init__()
        self.shapes = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if func.overloadpacket.__name__ in ("clone", "copy_", "contiguous"):
            self.shapes.append(tuple(out.shape))
        return out


def test_the_vision_tower_makes_no_layout_copy_of_its_activations(tiny_model):
    # issue #22: from the patch embedding to the pooled token the activations stay (N, L, D) batch first: no linear
    # layer, attention call or their backward copies one to make it contiguous (before: the (N, L, 3D) gradient of
    # q, k, v was copied once per block). The MLP weights require grad, as the student's do.
    n, tokens, width = 3, tiny_model.visual.positional_embedding.shape[0], tiny_model.visual.conv1.weight.shape[0]
    params = {k: v.detach().clone().requires_grad_(".mlp." in k or ".attn." in k)
              for k, v in tiny_model.named_parameters()}
    images = torch.randn(n, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    with Copies() as copies:
        features = torch.func.functional_call(tiny_model, params, (images,))
        features.square().sum().backward()
    activations = [shape for shape in copies.shapes if math.prod(shape) in
                   {n * tokens * width * k for k in (1, 3, 4)}]  # (N, L, D), q k v together, the MLP's hidden
    assert activations == [], activations
    assert params["visual.transformer.resblocks.0.mlp.c_fc.weight"].grad is not None  # the backward did run


def test_layer_norm_of_fp32_is_one_op():
    # LayerNorm computes in fp32: for an fp32 input the casts are no-ops, so the tensor is read once
    ln = clip_min.LayerNorm(16)
    x = torch.randn(4, 16)
    with OpsOn(x.numel()) as ops:
        ln(x)
    assert ops.ops == ["native_layer_norm"]
    x = x.half()
    with OpsOn(x.numel()) as ops:  # an fp16 input is cast up and back, as OpenAI's
        ln(x)
    assert ops.ops == ["_to_copy", "native_layer_norm", "_to_copy"]
