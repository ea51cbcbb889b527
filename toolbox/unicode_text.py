"""What OpenAI's tokenizer gets from ftfy and the `regex` module, without them: `fix_text` (ftfy's fix_text
without its mojibake repair) and `category` (a character's Unicode class, with the letters and numbers newer than
this Python's unicodedata).

clip_min's tokenizer reads as OpenAI's: `clean` calls fix_text, the pre-tokenizer's character classes call
category. tests/test_unicode_text.py checks fix_text against ftfy on every kind of text; tests/test_clip_min.py
checks the classes against the `regex` module on every code point.
"""

import bisect
import html
import html.entities
import math
import re
import unicodedata

# ftfy's fix_text, as OpenAI runs it (ftfy 6.3.1, default TextFixerConfig), without its mojibake repair.
# The facts below (which characters each fix rewrites, the order of the fixes) are read from ftfy 6.3.1's
# fixes.py, chardata.py and __init__.py; the tables are built here from unicodedata and Python's codecs.
# In ftfy's order:

# unescape_html: only references ending in ';' ("this&not that" stays)...
_HTML_ENTITY = re.compile(r"&#?[0-9A-Za-z]{1,24};")
# ...and the all-caps spelling of a lower-case HTML5 name where html.unescape reads none of it ('&EACUTE;' -> 'É';
# not '&COPYSR;', which html.unescape reads as '©SR;')
_CAPS_ENTITIES = {f"&{name.upper()}": char.upper() for name, char in html.entities.html5.items()
                  if name.endswith(";") and name.islower() and html.unescape(f"&{name.upper()}") == f"&{name.upper()}"}
# fix_c1_controls: U+0080-U+009F read as Windows-1252 bytes ('\x93' -> '“'); the five bytes Windows-1252 leaves
# undefined (81 8D 8F 90 9D) stay, as in ftfy's "sloppy" codec
_C1_CONTROLS = {b: bytes([b]).decode("cp1252", errors="ignore") or chr(b) for b in range(0x80, 0xA0)}
# fix_latin_ligatures: these 22 Latin ligatures and digraphs become their letters (one level of their Unicode
# compatibility decomposition: 'ﬅ' -> 'ſt', not NFKC's 'st'); 'æ', 'œ' and non-Latin ligatures stay
_LIGATURES = str.maketrans({c: "".join(chr(int(h, 16)) for h in unicodedata.decomposition(c).split()[1:])
                            for c in "ĲĳŉǄǅǆǇǈǉǊǋǌǱǲǳﬀﬁﬂﬃﬄﬅﬆ"})
# fix_character_width: the full- and half-width forms block (U+FF01-U+FFEF) to its NFKC form, and the
# ideographic space to a space
_WIDTH = {0x3000: " "} | {c: unicodedata.normalize("NFKC", chr(c)) for c in range(0xFF01, 0xFFF0)
                          if unicodedata.normalize("NFKC", chr(c)) != chr(c)}
# uncurl_quotes
_STRAIGHT_QUOTES = dict.fromkeys([0x02BC, *range(0x2018, 0x201C)], "'") | dict.fromkeys(range(0x201C, 0x2020), '"')
# fix_line_breaks: CR LF (replaced first), CR, line and paragraph separators, NEL to LF
_LINE_BREAKS = dict.fromkeys(map(ord, "\r\u2028\u2029\x85"), "\n")
# fix_surrogates
_SURROGATE_PAIR, _SURROGATE = re.compile("[\ud800-\udbff][\udc00-\udfff]"), re.compile("[\ud800-\udfff]")
# remove_terminal_escapes: ANSI "ESC [ digits/semicolons letter" (\d: any Unicode digit, as in ftfy's `re`)
_TERMINAL_ESCAPE = re.compile(r"\x1b\[[\d;]*[a-zA-Z]")
# remove_control_chars: C0 controls but \t \n \f \r, DEL, deprecated Arabic format controls, BOM, interlinear
# annotation marks, object replacement (not C1 controls, joiners, bidi marks, tags)
_CONTROL_CHARS = dict.fromkeys([*range(0x00, 0x09), 0x0B, *range(0x0E, 0x20), 0x7F, *range(0x206A, 0x2070),
                                0xFEFF, *range(0xFFF9, 0xFFFD)])
FTFY_SEGMENT = 1_000_000  # ftfy fixes a text line by line, lines cut to segments of at most this many characters


def _chained(*tables):
    """One str.translate table that does `tables` one after another."""
    table = {}
    for c in set().union(*tables):
        table[c] = chr(c)
        for t in tables:
            table[c] = table[c].translate(t)
    return table


_FIX_CHARACTERS = _chained(_C1_CONTROLS, _LIGATURES, _WIDTH, _STRAIGHT_QUOTES, _LINE_BREAKS)


def _unescape_entity(match):
    """An HTML reference ftfy decodes: one that html.unescape reads whole (';' included), or an all-caps name."""
    entity = match.group()
    decoded = html.unescape(entity)
    return decoded if ";" not in decoded else _CAPS_ENTITIES.get(entity, entity)


def _fix_surrogates(text):
    """UTF-16 surrogate pairs to the character they encode, lone surrogates to U+FFFD (a str may hold them)."""
    text = _SURROGATE_PAIR.sub(lambda m: m.group().encode("utf-16-le", "surrogatepass").decode("utf-16-le"), text)
    return _SURROGATE.sub("\ufffd", text)


def _fix_segment(text, unescape):
    """ftfy's fixes on one segment, in its order, repeated until the text stops changing (as ftfy does)."""
    while True:
        before = text
        if unescape:
            text = _HTML_ENTITY.sub(_unescape_entity, text)
        # CR LF first: no character fix makes or takes a CR or LF, so this is ftfy's order too
        text = _fix_surrogates(text.replace("\r\n", "\n").translate(_FIX_CHARACTERS))
        text = _TERMINAL_ESCAPE.sub("", text).translate(_CONTROL_CHARS)
        text = unicodedata.normalize("NFC", text)
        if text == before:
            return text


def fix_text(text):
    """ftfy.fix_text without mojibake repair: segment by segment (lines, cut every FTFY_SEGMENT characters).
    HTML references are decoded only before the first segment holding a '<' (ftfy takes that text for HTML)."""
    unescape, fixed = True, []
    for line in re.findall(r"[^\n]*\n|[^\n]+", text):
        for start in range(0, len(line), FTFY_SEGMENT):
            segment = line[start:start + FTFY_SEGMENT]
            unescape = unescape and "<" not in segment
            fixed.append(_fix_segment(segment, unescape))
    return "".join(fixed)


# ----------------------------------------------------------------------------------------------------
# Unicode categories

# Letters (L) and numbers (N) in the regex module 2026.11.19's Unicode data that Python 3.11's unicodedata
# (Unicode 14.0) doesn't know yet: (first, last, class), sorted; used only for characters unicodedata calls 'Cn'
_NEWER_LETTERS_AND_NUMBERS = (
    (0x558, 0x558, "L"), (0x58B, 0x58C, "L"), (0x88F, 0x88F, "L"), (0xC5C, 0xC5C, "L"), (0xCDC, 0xCDC, "L"),
    (0x1C89, 0x1C8A, "L"), (0x208F, 0x208F, "L"), (0x209D, 0x209F, "L"), (0xA7CB, 0xA7CF, "L"), (0xA7D2, 0xA7D2, "L"),
    (0xA7D4, 0xA7D4, "L"), (0xA7DA, 0xA7DD, "L"), (0xA7E2, 0xA7E2, "L"), (0xA7F1, 0xA7F1, "L"), (0xAB6C, 0xAB6D, "L"),
    (0x105C0, 0x105F3, "L"), (0x107BB, 0x107BF, "L"), (0x10940, 0x10959, "L"), (0x10D40, 0x10D49, "N"),
    (0x10D4A, 0x10D65, "L"), (0x10D6F, 0x10D85, "L"), (0x10EC2, 0x10EC7, "L"), (0x10ED9, 0x10EEE, "L"),
    (0x1123F, 0x11240, "L"), (0x11380, 0x11389, "L"), (0x1138B, 0x1138B, "L"), (0x1138E, 0x1138E, "L"),
    (0x11390, 0x113B5, "L"), (0x113B7, 0x113B7, "L"), (0x113D1, 0x113D1, "L"), (0x113D3, 0x113D3, "L"),
    (0x116D0, 0x116E3, "N"), (0x11B0A, 0x11B0A, "L"), (0x11BC0, 0x11BE0, "L"), (0x11BF0, 0x11BF9, "N"),
    (0x11DB0, 0x11DDB, "L"), (0x11DE0, 0x11DE9, "N"), (0x11DF1, 0x11DF1, "L"), (0x11F02, 0x11F02, "L"),
    (0x11F04, 0x11F10, "L"), (0x11F12, 0x11F33, "L"), (0x11F50, 0x11F59, "N"), (0x1246F, 0x1246F, "N"),
    (0x12475, 0x1247F, "N"), (0x12550, 0x12686, "N"), (0x1342F, 0x1342F, "L"), (0x13441, 0x13446, "L"),
    (0x13460, 0x143FA, "L"), (0x16100, 0x1611D, "L"), (0x16130, 0x16139, "N"), (0x16D40, 0x16D6C, "L"),
    (0x16D70, 0x16D79, "N"), (0x16EA0, 0x16EB8, "L"), (0x16EBB, 0x16ED3, "L"), (0x16FF2, 0x16FF3, "L"),
    (0x16FF4, 0x16FF6, "N"), (0x187F8, 0x187FF, "L"), (0x18CD6, 0x18CDA, "L"), (0x18CFF, 0x18CFF, "L"),
    (0x18D09, 0x18D20, "L"), (0x18D80, 0x18DF2, "L"), (0x18E00, 0x19191, "L"), (0x191A0, 0x191D2, "L"),
    (0x1B123, 0x1B128, "L"), (0x1B132, 0x1B132, "L"), (0x1B155, 0x1B155, "L"), (0x1B168, 0x1B168, "L"),
    (0x1CCF0, 0x1CCF9, "N"), (0x1D2C0, 0x1D2D3, "N"), (0x1D6A6, 0x1D6A6, "L"), (0x1DF1F, 0x1DF81, "L"),
    (0x1DF90, 0x1DF96, "L"), (0x1DFCD, 0x1DFFF, "L"), (0x1E030, 0x1E06D, "L"), (0x1E4D0, 0x1E4EB, "L"),
    (0x1E4F0, 0x1E4F9, "N"), (0x1E5D0, 0x1E5ED, "L"), (0x1E5F0, 0x1E5F0, "L"), (0x1E5F1, 0x1E5FA, "N"),
    (0x1E6C0, 0x1E6DE, "L"), (0x1E6E0, 0x1E6E2, "L"), (0x1E6E4, 0x1E6E5, "L"), (0x1E6E7, 0x1E6ED, "L"),
    (0x1E6F0, 0x1E6F4, "L"), (0x1E6FE, 0x1E6FF, "L"), (0x2B739, 0x2B73F, "L"), (0x2B81E, 0x2B81E, "L"),
    (0x2CEA2, 0x2CEAD, "L"), (0x2EBF0, 0x2EE5D, "L"), (0x31350, 0x33479, "L"), (0x3D000, 0x3FC3F, "L"),
)


def category(c):
    """The major class of c's Unicode general category ('L', 'N', 'P', ...); for a character this Python's
    unicodedata doesn't know ('Cn'), the class the newer table gives it."""
    general = unicodedata.category(c)
    if general == "Cn":
        i = bisect.bisect_right(_NEWER_LETTERS_AND_NUMBERS, (ord(c), math.inf))  # the last range starting <= c
        if i and ord(c) <= _NEWER_LETTERS_AND_NUMBERS[i - 1][1]:
            return _NEWER_LETTERS_AND_NUMBERS[i - 1][2]
    return general[0]
