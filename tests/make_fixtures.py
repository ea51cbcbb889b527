"""Generate tests/fixtures/ with OpenAI's own code (PyPI openai-clip==1.0.1), for the parity tests.

    python tests/make_fixtures.py     (or: make fixtures)

Needs OpenAI's `clip/` folder ($ORTHCR_OPENAI_CLIP or .cache/openai-clip-1.0.1/clip), ftfy and regex (for
OpenAI's tokenizer), and ../shared/data/splits for the class names of 7 CoOp benchmarks. Writes:
  tiny_clip.jit.pt      a tiny random CLIP as a TorchScript archive made by torch.jit.trace of OpenAI's model,
                        fp16 weights (OpenAI's convert_weights) + the 3 extra buffers, like the published file
  tiny_clip.state.pt    the same weights as a plain torch.save'd state dict
  tiny_clip_outputs.pt  fixed inputs and OpenAI's image features, text features and logits on them (fp32, CPU)
  tokens.json           a text corpus and OpenAI's SimpleTokenizer ids for each text (no start/end tokens): class
                        names, prompts, PIECES, random texts from BLOCKS (`python tests/make_fixtures.py tokens`
                        writes only this file; `... parity [n [seed]]` measures clip_min's parity on n random texts)
"""

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


# Unicode ranges (first, last) the random corpus draws characters from: scripts, symbols, emoji, and the characters
# each of ftfy's fixes rewrites (C0/C1 controls, ligatures, full/half-width forms, quotes, surrogates, BOM, ...)
BLOCKS = [
    (0x00, 0x1F), (0x20, 0x7E), (0x7F, 0x9F), (0xA0, 0xFF), (0x100, 0x24F), (0x250, 0x2FF), (0x300, 0x36F),
    (0x370, 0x3FF), (0x400, 0x52F), (0x530, 0x58F), (0x590, 0x5FF), (0x600, 0x6FF), (0x700, 0x8FF),
    (0x900, 0x97F), (0x980, 0xDFF), (0xE00, 0xEFF), (0xF00, 0xFFF), (0x1000, 0x10FF), (0x1100, 0x11FF),
    (0x1200, 0x139F), (0x13A0, 0x167F), (0x1680, 0x19FF), (0x1A00, 0x1CFF), (0x1D00, 0x1DFF), (0x1E00, 0x1FFF),
    (0x2000, 0x206F), (0x2070, 0x20CF), (0x20D0, 0x20FF), (0x2100, 0x218F), (0x2190, 0x23FF), (0x2400, 0x24FF),
    (0x2500, 0x27BF), (0x27C0, 0x2BFF), (0x2C00, 0x2E7F), (0x2E80, 0x2FFF), (0x3000, 0x303F), (0x3040, 0x30FF),
    (0x3100, 0x31FF), (0x3200, 0x33FF), (0x3400, 0x4DBF), (0x4E00, 0x9FFF), (0xA000, 0xA6FF), (0xA700, 0xABFF),
    (0xAC00, 0xD7FF), (0xD800, 0xDFFF), (0xE000, 0xF8FF), (0xF900, 0xFAFF), (0xFB00, 0xFB4F), (0xFB50, 0xFDFF),
    (0xFE00, 0xFE6F), (0xFE70, 0xFEFF), (0xFF00, 0xFFEF), (0xFFF0, 0xFFFF), (0x10000, 0x1049F),
    (0x104A0, 0x10FFF), (0x11000, 0x11FFF), (0x12000, 0x16FFF), (0x17000, 0x1BFFF), (0x1D000, 0x1D7FF),
    (0x1E000, 0x1EFFF), (0x1F000, 0x1F2FF), (0x1F300, 0x1F6FF), (0x1F700, 0x1FBFF), (0x20000, 0x2FFFF),
    (0x30000, 0x3FFFF), (0xE0000, 0xE01EF), (0x0, 0x10FFFF),
]

# pieces the random corpus splices in, by what they exercise: each of ftfy's fixes and each alternative of OpenAI's
# pattern
PIECES = dict(
    html=[  # named, numeric, all-caps, nested, without ';', invalid, and the '<' that turns ftfy's unescaping off
        "&amp;", "&lt;", "&gt;", "&quot;", "&#39;", "&#x263A;", "&nbsp;", "&amp;amp;", "&amp;amp;amp;", "&AMP;",
        "&eacute;", "&EACUTE;", "&SZLIG;", "&NTILDE;", "&nTILDE;", "&#65;", "&#x41;", "&#0;", "&#128;", "&#x80;",
        "&#x9F;", "&#xD800;", "&#55357;&#56489;", "&#x110000;", "&#xFB01;", "&#xFF21;", "&#xFEFF;", "&#27;",
        "&#x1b;[31m", "&amp", "&lt", "&copy", "&notit;", "&ampx;", "&frac12;", "&FRAC12;", "&#12a;", "&#x;",
        "&hellip;", "&rsquo;", "&ldquo;", "&Jscr;", "&HilbertSpace;", "&lt;tag&gt;", "&amp;lt;", "<", "<b>",
        "&#8232;", "&#x2028;", "&NotANamedEntityAtAll;", "&#x0000000041;", "&#xfdd0;", "&LT;", "&Lt;", "&COPYSR;",
    ],
    controls=[  # terminal escapes, C0 and C1 controls, BOM and other format characters
        "\x1b[31m", "\x1b[0m", "\x1b[1;32m", "\x1b[K", "\x1b[", "\x1b[\u0661m", "\x1b\x01[2m", "\x1b\uff3b31m",
        "\x00", "\x07", "\x08", "\x0e", "\x1a", "\x1c", "\x1f", "\x7f", "\x80", "\x8d", "\x91", "\x93", "\x9d",
        "\x9f", "\ufeff", "\ufeffabc", "\u200b", "\u200c", "\u200d", "\u200e", "\u202e", "\u2060", "\u206a",
        "\u206f", "\u00ad", "\u180e", "\ufff9", "\ufffb", "\ufffc", "\ufffd", "\U000e0001", "\U0001d173",
    ],
    whitespace=[" ", "  ", "\t", "\u00a0", "\u1680", "\u2000", "\u2007", "\u200a", "\u202f", "\u205f", "\u3000",
                "\n", "\r\n", "\r", "\n\n", "\r\r\n", "\u2028", "\u2029", "\x85", "\x0b", "\x0c"],  # and line breaks
    surrogates=["\ud83d\udca9", "\udca9\ud83d", "\ud83d", "\udca9", "\ud800\udc00"],  # a Python str may hold them
    emoji=[  # ZWJ sequences, flags, keycaps, tag sequences, skin tones, variation selectors
        "\U0001f436", "\U0001f469\u200d\U0001f469\u200d\U0001f467", "\U0001f468\U0001f3fd\u200d\U0001f4bb",
        "\U0001f3f3\ufe0f\u200d\U0001f308", "\U0001f1ef\U0001f1f5", "\u2764\ufe0f", "1\ufe0f\u20e3", "\ufe0e",
        "\U0001f3f4\U000e0067\U000e0062\U000e0077\U000e006c\U000e0073\U000e007f", "\u270c\U0001f3ff",
    ],
    combining=[  # NFC compositions: Latin, Greek ypogegrammeni, Hangul jamo, half-width katakana + voiced mark
        "e\u0301", "a\u0300", "o\u0308\u0304", "\u0345", "\u03b9\u0345", "A\u030a", "\u1100\u1161\u11a8",
        "\uff76\uff9e", "\u0915\u093c", "\u05d1\u05bc", "\u0301",
    ],
    forms=[  # ligatures and digraphs, full- and half-width forms, curly quotes
        "\ufb01", "\ufb02", "\ufb00", "\ufb03", "\ufb04", "\ufb05", "\ufb06", "\u0132", "\u0149", "\u01c4",
        "\u01c5", "\u01c9", "\u01f2", "\ufb13", "\uff28\uff45\uff4c\uff4c\uff4f", "\uff11\uff12\uff13",
        "\uff21\uff22", "\uff41\uff42", "\uff76\uff80\uff76\uff85", "\uffe5", "\uffe0", "\uff07s", "\uff5f",
        "\uffe8", "\u2018", "\u2019", "\u201a", "\u201b", "\u201c", "\u201d", "\u201e", "\u201f", "\u02bc",
        "\u2019s", "\u02bcll",
    ],
    pattern=[  # contractions (any case, long s), special tokens, number characters, runs of symbols
        "'s", "'S", "'\u017f", "'t", "'re", "'ve", "'m", "'ll", "'LL", "'d", "''", "n't", "<|startoftext|>",
        "<|endoftext|>", "<|\u017ftartoftext|>", "<|STARTOFTEXT|>", "<|endoftext", "x\u00b2\u00bd",
        "\u2163\u216b\u2170", "\u0663\u096a\u0e53", "\u2460\u2461", "3.14", "1,000", "!!!", "...", "--", "#@$%",
    ],
    words=["a", "photo", "of", "the", "cat", "Dog", "STRASSE", "\u0130stanbul", "\u039f\u0394\u039f\u03a3", "caf\u00e9",
           "na\u00efve", "\u65e5\u672c", "\ud55c\uad6d\uc5b4", "\u041c\u043e\u0441\u043a\u0432\u0430", "New York"],
)


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


def mojibake_free(text, ftfy):
    """True when ftfy's mojibake repair changes nothing in OpenAI's cleaning of `text`: the texts on which clip_min
    promises OpenAI's ids (its cleaning is the rest of ftfy.fix_text). Stricter than fix_encoding(text) == text:
    ftfy also repairs mojibake that its other fixes make, as '&NTILDE;&frac12;' -> 'Ñ½' -> 'ѽ'."""
    return ftfy.fix_text(text) == ftfy.fix_text(text, fix_encoding=False)


def random_corpus(n, seed=0):
    """n random texts: characters from 1-3 of BLOCKS mixed with PIECES of 1-3 kinds, words and spaces; a few are
    whitespace only or a prompt around random characters."""
    rng = random.Random(seed)

    def character(blocks):
        first, last = rng.choice(blocks)
        return chr(rng.randint(first, last))

    def text():
        blocks = rng.sample(BLOCKS, rng.randint(1, 3))
        pieces = [p for kind in rng.sample(sorted(PIECES), rng.randint(1, 3)) for p in PIECES[kind]]
        kind = rng.random()
        if kind < 0.05:
            return "".join(rng.choices(PIECES["whitespace"], k=rng.randint(1, 8)))
        if kind < 0.15:
            return f"a photo of a {''.join(character(blocks) for _ in range(rng.randint(1, 8)))}."
        draws = [rng.random() for _ in range(rng.randint(1, 30))]
        return "".join(character(blocks) if r < 0.55 else rng.choice(pieces) if r < 0.8 else
                       rng.choice(PIECES["words"]) if r < 0.9 else " " for r in draws)

    return [text() for _ in range(n)]


def measure_parity(n=20000, seed=0):
    """Print how many of `n` random texts (and the fixture corpus) clip_min.encode gives OpenAI's ids for, among
    those ftfy.fix_encoding leaves alone; list the others with what ftfy's mojibake repair did to them."""
    import ftfy
    sys.path.insert(0, str(ROOT))
    import clip_min
    tokenizer = openai_module("simple_tokenizer").SimpleTokenizer()
    fixtures = [text for text, _ in json.loads((OUT / "tokens.json").read_text())["texts_and_ids"]]
    texts = list(dict.fromkeys(random_corpus(n, seed) + fixtures))

    def ours(text):
        try:
            return clip_min.encode(text)
        except Exception as e:  # an error is a difference (an older clip_min fails on surrogates)
            return e

    kept = [t for t in texts if ftfy.fix_encoding(t) == t]
    differ = [t for t in kept if ours(t) != tokenizer.encode(t)]
    print(f"{len(kept) - len(differ)} of {len(kept)} texts give OpenAI's ids ({len(texts)} texts, of which "
          f"{len(kept)} are left alone by ftfy.fix_encoding)")
    for t in differ:
        print(f"  differ{'' if mojibake_free(t, ftfy) else ' (mojibake repaired inside fix_text)'}: {ascii(t)} "
              f"-> ftfy {ascii(ftfy.fix_text(t))}")


def save_token_fixtures(st, n_random=1000):
    import ftfy
    names = classnames()
    corpus = [name for group in names.values() for name in group]
    corpus += [p.format(name) for p in PROMPTS[:8] for name in names.get("imagenet", [])[:50]]
    corpus += PROMPTS + [p for kind in PIECES.values() for p in kind] + random_corpus(n_random, seed=1)
    corpus = list(dict.fromkeys(corpus))
    kept = [t for t in corpus if mojibake_free(t, ftfy)]
    tokenizer = st.SimpleTokenizer()
    header = dict(benchmarks={k: len(v) for k, v in names.items()}, dropped_by_ftfy=len(corpus) - len(kept))
    # one [text, ids] a line, in ASCII JSON (some texts hold lone surrogates, which UTF-8 can't write)
    pairs = ",\n".join(json.dumps([t, tokenizer.encode(t)]) for t in kept)
    (OUT / "tokens.json").write_text(json.dumps(header)[:-1] + ', "texts_and_ids": [\n' + pairs + "\n]}\n")
    print(f"tokens.json: {len(kept)} texts (class names of {len(names)} benchmarks, prompts, pieces, {n_random} "
          f"random texts); {len(corpus) - len(kept)} dropped (ftfy would repair mojibake)")


if __name__ == "__main__":
    # no argument: every fixture; `tokens`: tokens.json only; `parity [n [seed]]`: measure parity, write nothing
    what = sys.argv[1] if len(sys.argv) > 1 else "all"
    OUT.mkdir(exist_ok=True)
    random.seed(0)
    if what == "parity":
        measure_parity(*map(int, sys.argv[2:4]))  # [n [seed]]
        sys.exit()
    if what == "all":
        save_model_fixtures(openai_module("model"))
    save_token_fixtures(openai_module("simple_tokenizer"))
    for p in sorted(OUT.glob("*.*")):
        print(f"{p.relative_to(ROOT)}: {p.stat().st_size / 1024:.0f} KiB")
