"""Writes the tokenizer test corpus and the Python `tokenizers` package's reference outputs for it.

    .venv/bin/python ops/tests/data/tokenizer/make_tokenizer_refs.py

corpus.json: a list of strings (ASCII, accents, CJK, emoji and ZWJ sequences, RTL, control and whitespace runs, code,
very long lines, the empty string, special tokens typed in the text), deterministic (seeded).
refs_<name>.json, for each tokenizer.json in TOKENIZERS: per string, `Tokenizer.encode(text)`'s ids, attention mask
and (char) offsets, and `decode(ids)` with and without skip_special_tokens.
"""

import json
import pathlib
import random

import tokenizers

HERE = pathlib.Path(__file__).resolve().parent
REPO = HERE.parents[3]
TOKENIZERS = {
    "smollm2": HERE / "smollm2" / "tokenizer.json",
    "minilm": HERE / "minilm" / "tokenizer.json",
    "tiny_gpt2": REPO / "conformance/fixtures/tiny/tiny-gpt2/onnx_optimum/tokenizer.json",
}

ASCII = [
    "Hello, world!",
    "The quick brown fox jumps over the lazy dog.",
    "hello world",
    "HELLO WORLD",
    "Hello   world",
    "It's a dog's life, isn't it? We'll see; they'd've known.",
    "I can't believe it's not butter!",
    "e-mail: someone@example.com, web: https://example.org/path?q=1&r=2#frag",
    "Numbers: 0 1 12 123 1234 12345 123456 3.14159 -42 +7 1e-9 0xFF 1,000,000",
    "Dates: 2024-01-31, 31/01/2024, Jan. 31st; times 12:34:56.789",
    "Punctuation!!! ??? ... --- ___ *** ### @@@ $$$ %%% ^^^ &&& ((( ))) [[[ ]]] {{{ }}}",
    "a",
    " ",
    "A",
    "?",
    "tokenization",
    "unbelievably antidisestablishmentarianism supercalifragilisticexpialidocious",
    "The U.S.A. and the U.K. signed the N.A.T.O. treaty.",
    "camelCaseIdentifier snake_case_identifier SCREAMING_CASE kebab-case",
    "Mr. Smith went to Washington D.C. on Tuesday.",
    "She said, \"Don't do that!\" and left.",
    "'single quotes' and \"double quotes\" and `backticks`",
    "Tabs\tseparate\tcolumns",
    "Line one\nLine two\nLine three",
    "Windows\r\nline\r\nendings",
    "  leading spaces",
    "trailing spaces   ",
    "    ",
    "multiple     internal      spaces",
    "What is the capital of France?",
    "Summarize the following text in one sentence.",
    "Once upon a time, in a land far, far away, there lived a king.",
    "The mitochondria is the powerhouse of the cell.",
    "To be, or not to be, that is the question.",
    "1 + 1 = 2; 2 * 3 = 6; 10 / 4 = 2.5; 2 ** 10 = 1024",
    "#hashtag @mention $TICKER ~tilde |pipe| \\backslash/",
    "ALL CAPS SENTENCE WITH NUMBERS 123 AND SYMBOLS !@#",
    "a b c d e f g h i j k l m n o p q r s t u v w x y z",
    "aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa",
    "!!!!!!!!!!!!!!!!!!!!",
    "..........",
    "lowercase words only here",
]

ACCENTS = [
    "café",
    "naïve façade",
    "Crème brûlée à la carte",
    "Ærøskøbing",
    "e\u0301 (combining acute) vs é (precomposed)",
    "Straße Maß Fuß",
    "İstanbul ıiIİ",
    "Zażółć gęślą jaźń",
    "Tiếng Việt có dấu",
    "São Paulo, Bogotá, Reykjavík",
    "Ångström Œuvre œuf",
    "ñandú pingüino",
    "Dvořák Škoda Čapek",
    "Kraków Łódź Gdańsk",
    "Ελληνικά: Καλημέρα κόσμε",
    "Русский: Привет, мир!",
    "Українська: Добрий день",
    "ﬁ ﬂ ﬀ ligatures",
    "Ｆｕｌｌｗｉｄｔｈ ＡＳＣＩＩ",
    "ÀÁÂÃÄÅàáâãäå ÈÉÊËèéêë",
    "a\u0308o\u0308u\u0308",
    "Z\u0351\u0307\u0310a\u0315\u035al\u0322g\u0327o\u0337",
]

CJK = [
    "你好，世界！",
    "我爱自然语言处理。",
    "中文分词是一个难题",
    "日本語のテキストです。",
    "ひらがな カタカナ 漢字",
    "東京は日本の首都です",
    "한국어 텍스트입니다.",
    "안녕하세요 세계",
    "混合 mixed テキスト text 한글",
    "「引用」『二重』【括弧】",
    "全角スペース\u3000と半角スペース",
    "ＡＢＣ１２３",
    "𠀀𠀁𠀂 (CJK extension B)",
    "你好" * 50,
    "这是一个很长的句子，用来测试分词器在处理中文文本时的表现，包括标点符号、数字123和英文words。",
    "ｶﾀｶﾅ半角",
    "中文,English,日本語;한국어",
    "〇一二三四五六七八九十",
    "漢字かな交じり文",
    "一",
]

EMOJI = [
    "😀",
    "I love pizza 🍕🍕🍕",
    "👨\u200d👩\u200d👧\u200d👦 family",
    "🏳\ufe0f\u200d🌈 rainbow flag",
    "👍🏻👍🏼👍🏽👍🏾👍🏿",
    "🇫🇷🇩🇪🇯🇵🇺🇸",
    "1\ufe0f\u20e3 2\ufe0f\u20e3 #\ufe0f\u20e3",
    "❤\ufe0f ❤ ♥",
    "🧑\u200d💻 coding",
    "👩🏽\u200d🚀 astronaut",
    "🤷\u200d♂\ufe0f",
    "😀😃😄😁😆😅😂🤣",
    "emoji at end 🎉",
    "🎉 emoji at start",
    "mixed 🚀 text 🌍 with 🔥 emoji",
    "👁\u200d🗨",
    "🏴\U000e0067\U000e0062\U000e0073\U000e0063\U000e0074\U000e007f Scotland",
    "☺ ☻ ✌ ✔ ✘ ★ ☆",
    "🫠🫡🫶",
    "\u200d\u200d\u200d",
]

RTL = [
    "مرحبا بالعالم",
    "اللغة العربية جميلة",
    "שלום עולם",
    "עברית היא שפה",
    "Hello مرحبا world עולם",
    "\u200fRLM mark\u200e LRM mark",
    "فارسی: سلام دنیا",
    "اردو: ہیلو",
    "١٢٣٤٥٦٧٨٩٠ Arabic digits",
    "\u202eright-to-left override\u202c",
    "مَرْحَبًا (with harakat)",
    "ﷺ ﷽",
    "HTML <p dir=\"rtl\">مرحبا</p>",
    "numbers 123 in עברית 456",
    "ܫܠܡܐ Syriac",
]

CONTROL = [
    "\t",
    "\n",
    "\r\n",
    "\n\n\n\n",
    "\t\t\t\t",
    " \t \n \r ",
    "\x00",
    "null\x00byte",
    "bell\x07 backspace\x08 escape\x1b",
    "\x1b[31mred\x1b[0m",
    "form\x0cfeed vertical\x0btab",
    "\x7f delete",
    "\u0085 next line",
    "line\u2028separator paragraph\u2029separator",
    "no\u00a0break\u00a0space",
    "zero\u200bwidth\u200bspace",
    "soft\u00adhyphen",
    "\ufeffBOM at start",
    "ideographic\u3000space",
    "thin\u2009space en\u2002space em\u2003space",
    " " * 100,
    "\n" * 50,
    "word\n\n\nword\t\t\tword   word",
    "\x01\x02\x03\x04\x05\x06",
    "end with newline\n",
    "\ufffd replacement char",
]

CODE = [
    "def hello(name: str) -> str:\n    return f\"Hello, {name}!\"\n",
    "fn main() {\n    println!(\"Hello, world!\");\n}\n",
    "for (int i = 0; i < n; ++i) { sum += a[i] * b[i]; }",
    '{"key": "value", "list": [1, 2, 3], "nested": {"a": null, "b": true}}',
    "<html><head><title>Test</title></head><body><p class=\"x\">Hi</p></body></html>",
    "SELECT id, name FROM users WHERE age > 30 ORDER BY name DESC LIMIT 10;",
    "ls -la | grep '\\.rs$' | wc -l && echo \"done\" || exit 1",
    "const x = (a, b) => a ?? b; let y = x?.z ?? [];",
    "import numpy as np\nx = np.zeros((3, 4), dtype=np.float32)\n",
    "regex: ^[A-Za-z0-9._%+-]+@[A-Za-z0-9.-]+\\.[A-Za-z]{2,}$",
    "    indented with four spaces\n        and eight\n\tand a tab",
    "#include <stdio.h>\nint main(void) { printf(\"%d\\n\", 42); return 0; }",
    "x = [i**2 for i in range(10) if i % 2 == 0]",
    "a!=b a==b a<=b a>=b a->b a=>b a::b a..b a...b",
    "// comment\n/* block\n   comment */\n# shell comment",
    "git commit -m \"fix: handle empty input\" && git push origin main",
    "$ cargo build --release -p kiln-ops --target wasm32-unknown-unknown",
    "\\documentclass{article}\\begin{document}$E=mc^2$\\end{document}",
    "key1=value1;key2=value2&key3=value3",
    "0x7fffffff 0b1010 0o777 1_000_000u64 3.0e-10f32",
]

SPECIAL = [
    "<|endoftext|>",
    "Hello<|endoftext|>World",
    "<|im_start|>user\nWhat is 2+2?<|im_end|>\n<|im_start|>assistant\n",
    "<|im_start|><|im_start|><|im_end|>",
    "<|im_sta partial special token",
    "[CLS] hello [SEP] world [SEP]",
    "[PAD][PAD][MASK]",
    "[UNK] unknown",
    "<s>sentence</s>",
    "<pad> <unk> <mask>",
    "text with <|endoftext|> in the middle <|endoftext|>",
    "<|im_end|>",
    "[cls] lowercase special",
    "<|ENDOFTEXT|> wrong case",
    "< |endoftext| > spaced",
]

MISC = [
    "ภาษาไทยไม่มีช่องว่างระหว่างคำ",
    "हिन्दी भाषा नमस्ते",
    "বাংলা ভাষা",
    "தமிழ் மொழி",
    "ქართული ენა",
    "Հայերեն լեզու",
    "አማርኛ ቋንቋ",
    "ᚠᚢᚦᚨᚱᚲ runes",
    "∀x ∈ ℝ: x² ≥ 0 ∧ √4 = 2 ≠ π ≈ 3.14 ∞",
    "€100 £50 ¥1000 ₹500 ₿0.01 $20",
    "©®™ §¶† ‰ ‱",
    "← ↑ → ↓ ↔ ⇒ ⇔",
    "½ ¼ ¾ ⅓ ⅔",
    "x₁ x₂ xⁿ H₂O",
    "Ⅰ Ⅱ Ⅲ Ⅳ Ⅻ",
    "𝔘𝔫𝔦𝔠𝔬𝔡𝔢 𝕞𝕒𝕥𝕙 𝒮𝒸𝓇𝒾𝓅𝓉",
    "🀄 🃏 ♠♣♥♦",
    "ⓐⓑⓒ ⒜⒝⒞",
    "Ꭰ Ꭱ Ꭲ Cherokee",
    "ꦗꦮ Javanese",
]


def long_lines(rng):
    words = "lorem ipsum dolor sit amet consectetur adipiscing elit sed do eiusmod tempor".split()
    pool = "".join(ASCII[:10] + ACCENTS[:6] + CJK[:6] + EMOJI[:6] + RTL[:4])
    return [
        "a" * 5000,
        " ".join(rng.choice(words) for _ in range(3000)),
        "".join(rng.choice(pool) for _ in range(8000)),
        "9" * 2000,
        "https://example.com/" + "/".join(f"segment{i}" for i in range(500)),
        "ab " * 3000,
        "🙂" * 1000,
        "長" * 3000,
        ("word " * 40 + "\n") * 60,
    ]


def mixes(rng, pieces, n):
    out = []
    for _ in range(n):
        k = rng.randint(2, 5)
        sep = rng.choice([" ", "", "\n", " \t ", ", "])
        out.append(sep.join(rng.choice(pieces) for _ in range(k)))
    return out


def corpus():
    rng = random.Random(7)
    base = ASCII + ACCENTS + CJK + EMOJI + RTL + CONTROL + CODE + SPECIAL + MISC
    short = [s for s in base if len(s) < 200]
    strings = [""] + base + long_lines(rng) + mixes(rng, short, 40)
    seen, unique = set(), []
    for s in strings:
        if s not in seen:
            seen.add(s)
            unique.append(s)
    return unique


def main():
    strings = corpus()
    assert len(strings) >= 200, len(strings)
    (HERE / "corpus.json").write_text(json.dumps(strings, ensure_ascii=True, indent=0) + "\n")
    for name, path in TOKENIZERS.items():
        tok = tokenizers.Tokenizer.from_file(str(path))
        rows = []
        for s in strings:
            enc = tok.encode(s)
            ids = enc.ids
            rows.append(
                {
                    "ids": ids,
                    "attention_mask": enc.attention_mask,
                    "offsets": [list(o) for o in enc.offsets],
                    "decoded": tok.decode(ids, skip_special_tokens=False),
                    "decoded_skip": tok.decode(ids, skip_special_tokens=True),
                }
            )
        out = {"tokenizer": str(path.relative_to(REPO)), "tokenizers_version": tokenizers.__version__, "rows": rows}
        (HERE / f"refs_{name}.json").write_text(json.dumps(out, ensure_ascii=True, separators=(",", ":")) + "\n")
        lossless = sum(r["decoded_skip"] == s for r, s in zip(rows, strings))
        print(f"{name}: {len(rows)} strings, {sum(len(r['ids']) for r in rows)} ids, round-trips {lossless}")


if __name__ == "__main__":
    main()
