"""Generate tests/fixtures/ with OpenAI's own code (PyPI openai-clip==1.0.1), for the parity tests.

    python tests/make_fixtures.py     (or: make fixtures)

Needs OpenAI's `clip/` folder ($ORTHCR_OPENAI_CLIP or .cache/openai-clip-1.0.1/clip), ftfy and regex (for
OpenAI's tokenizer), and ../shared/data/splits for the class names of 7 CoOp benchmarks. Writes:
  tiny_clip.jit.pt      a tiny random CLIP as a TorchScript archive made by torch.jit.trace of OpenAI's model,
                        fp16 weights (OpenAI's convert_weights) + the 3 extra buffers, like the published file
  tiny_clip.state.pt    the same weights as a plain torch.save'd state dict
  tiny_clip_outputs.pt  fixed inputs and OpenAI's image features, text features and logits on them (fp32, CPU)
  tokens.json           a text corpus and OpenAI's SimpleTokenizer ids for each text (no start/end tokens)
"""

import html
import importlib.util
import json
import os
import random
import sys
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
OUT = HERE / "fixtures"

# the tiny architecture: widths multiples of 64 (OpenAI's head count is width // 64), a small vocabulary
TINY = dict(embed_dim=32, image_resolution=32, vision_layers=2, vision_width=64, vision_patch_size=8,
            context_length=77, vocab_size=300, transformer_width=64, transformer_heads=1, transformer_layers=2)

# prompts exercising every branch of the tokenizer; the class names of the benchmarks are added below
PROMPTS = [
    "a photo of a {}.", "a photo of a {}, a type of pet.", "a centered satellite photo of {}.",
    "a photo of a person doing {}.", "{} texture.", "a photo of a {}, a type of food.",
    "a photo of a {}, a type of aircraft.", "a photo of a {}, a type of flower.",
    "Hello, World! What's up? I'm fine; you're late, we've gone, they'll see, he'd know, it's isn't.",
    "IT'S ALL CAPS, DON'T SHOUT", "rock'n'roll ''quoted'' 'single' \"double\"", "3.14159 1,000,000 2024-01-31 10:45pm",
    "x² + y³ = z½ ¼ ⅓ Ⅻ ① ٣ ४ 三", "café naïve résumé Ünïcödé Ångström Øresund façade jalapeño",
    "Straße İstanbul ΣΑΣ σας Москва Київ", "日本語のテキスト 中文文本 한국어 텍스트", "東京タワーの写真。",
    "emoji 🐶🐱🚀 👩‍👩‍👧 🇯🇵 ❤️ ✨", "a &amp; b &lt;tag&gt; &quot;q&quot; &#39;s &#x263A; &nbsp;x &amp;amp;",
    "don’t “curly” ‘quotes’ ‚low‛ „double low‟ it’s", "tabs\tand\nnewlines\r\n  many   spaces\u3000ideographic",
    "<|startoftext|> special <|endoftext|> tokens", "!!!??? ... --- *** ### @user #hashtag $100 50% ~tilde~",
    "mixedCASE camelCase snake_case kebab-case dot.case", "a\u0301 e\u0300 precomposed à vs decomposed a\u0300",
    "ſ long s 'ſ", "a photo of a ΑΒΓ ͅ ι\u0345 with a combining ypogegrammeni",
    "a very long description " * 20, "word " * 100, "supercalifragilisticexpialidocious " * 10,
]


def openai_module(name):
    """OpenAI's clip/<name>.py imported as a file (its package __init__ needs torchvision)."""
    for d in (os.environ.get("ORTHCR_OPENAI_CLIP"), ROOT / ".cache" / "openai-clip-1.0.1" / "clip"):
        if d and (Path(d) / f"{name}.py").is_file():
            spec = importlib.util.spec_from_file_location(f"openai_clip_{name}", Path(d) / f"{name}.py")
            module = importlib.util.module_from_spec(spec)
            spec.loader.exec_module(module)
            return module
    sys.exit("OpenAI's clip/ folder not found: set ORTHCR_OPENAI_CLIP (see .ci/run)")


def tiny_openai_clip(oa, seed=0):
    """OpenAI's CLIP with its own random init, then every tensor perturbed (LayerNorm weights are ones and
    biases zeros at init: a test could not tell two of them apart), then OpenAI's fp16 conversion."""
    torch.manual_seed(seed)
    model = oa.CLIP(**TINY)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    oa.convert_weights(model)
    return model.eval()


def text_batch(vocab_size, lengths, seed):
    """(len(lengths), 77) ids: start, random ids, end at position length-1 (the largest id: pooled by argmax)."""
    g = torch.Generator().manual_seed(seed)
    text = torch.zeros(len(lengths), 77, dtype=torch.int32)
    for i, n in enumerate(lengths):
        text[i, 0], text[i, n - 1] = vocab_size - 2, vocab_size - 1
        text[i, 1:n - 1] = torch.randint(1, vocab_size - 2, (n - 2,), generator=g)
    return text


def save_model_fixtures(oa):
    model = tiny_openai_clip(oa)
    state_dict = {k: v.clone() for k, v in model.state_dict().items()}
    torch.save(state_dict, OUT / "tiny_clip.state.pt")

    # OpenAI's published archive also holds these three tensors (its loader deletes them); the model holds
    # two of them as plain ints, which the buffers replace
    for name, value in [("input_resolution", TINY["image_resolution"]), ("context_length", TINY["context_length"]),
                        ("vocab_size", TINY["vocab_size"])]:
        model.__dict__.pop(name, None)
        model.register_buffer(name, torch.tensor(value))
    image = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    text = text_batch(TINY["vocab_size"], [2, 9, 77], seed=2)
    traced = torch.jit.trace_module(model, {"forward": (image.half(), text), "encode_image": image.half(),
                                            "encode_text": text}, check_trace=False)
    torch.jit.save(traced, OUT / "tiny_clip.jit.pt")

    # reference outputs: OpenAI's loader on the state dict, in fp32 on the CPU (what clip.load does there)
    reference = oa.build_model(dict(state_dict)).float().eval()
    with torch.no_grad():
        logits_per_image, logits_per_text = reference(image, text)
        outputs = dict(image=image, text=text, image_features=reference.encode_image(image),
                       text_features=reference.encode_text(text),
                       logits_per_image=logits_per_image, logits_per_text=logits_per_text)
    torch.save(outputs, OUT / "tiny_clip_outputs.pt")


def classnames():
    """{benchmark: class names}: 7 from CoOp's split files in ../shared, the others from tests/fixtures/classnames."""
    names = {p.stem: p.read_text().splitlines() for p in sorted((OUT / "classnames").glob("*.txt"))}
    splits = ROOT.parent / "shared" / "data" / "splits"
    for path in sorted(splits.glob("split_zhou_*.json")):
        split = json.loads(path.read_text())
        by_label = {label: name for _, label, name in split["train"] + split["val"] + split["test"]}
        names[path.stem.removeprefix("split_zhou_")] = [by_label[k] for k in sorted(by_label)]
    if not splits.is_dir():
        print(f"warning: {splits} not found, the corpus lacks those 7 benchmarks' class names", file=sys.stderr)
    return names


def ftfy_irrelevant(text, ftfy, regex):
    """True when ftfy's repairs make no difference to OpenAI's cleaned text beyond what clip_min's cleaning
    also does (NFC, straight quotes): the texts on which token parity is promised."""
    sys.path.insert(0, str(ROOT))
    import clip_min

    def rest_of_cleaning(t):  # OpenAI's steps after ftfy
        return regex.sub(r"\s+", " ", html.unescape(html.unescape(t)).strip()).strip().lower()

    ours = clip_min.unicodedata.normalize("NFC", text).translate(clip_min.STRAIGHT_QUOTES)
    return rest_of_cleaning(ftfy.fix_text(text)) == rest_of_cleaning(ours)


def save_token_fixtures(st):
    import ftfy
    import regex
    names = classnames()
    corpus = [name for group in names.values() for name in group]
    corpus += [p.format(name) for p in PROMPTS[:8] for name in names.get("imagenet", [])[:50]]
    corpus += PROMPTS
    kept = [t for t in dict.fromkeys(corpus) if ftfy_irrelevant(t, ftfy, regex)]
    dropped = sorted(set(corpus) - set(kept))
    tokenizer = st.SimpleTokenizer()
    record = dict(benchmarks={k: len(v) for k, v in names.items()}, dropped_by_ftfy=dropped,
                  texts=kept, ids=[tokenizer.encode(t) for t in kept])
    (OUT / "tokens.json").write_text(json.dumps(record, ensure_ascii=False, indent=0) + "\n")
    print(f"tokens.json: {len(kept)} texts from {len(names)} benchmarks + prompts; dropped (ftfy would repair): "
          f"{dropped}")


if __name__ == "__main__":
    OUT.mkdir(exist_ok=True)
    random.seed(0)
    save_model_fixtures(openai_module("model"))
    save_token_fixtures(openai_module("simple_tokenizer"))
    for p in sorted(OUT.glob("*.*")):
        print(f"{p.relative_to(ROOT)}: {p.stat().st_size / 1024:.0f} KiB")
