#!/usr/bin/env python3
"""Reference encodings for libft's tokenizer.json BPE: byte-level (the format of Llama 3, Qwen2/Qwen3
and GPT-2/SmolLM) and sentencepiece-style (Metaspace and byte fallback: Llama 2, Mistral and TinyLlama
as transformers 5 saves them, without a tokenizer.model).

    bpe_reference.py OUT_DIR [SENTENCEPIECE_MODEL]

Trains 3000-token byte-level BPEs with the `tokenizers` library on real text (the fortune records and
Jargon File lines that tokenizer_reference.py reads) and saves them as four checkpoint-style directories,
each with tokenizer.json and tokenizer_config.json written by transformers' save_pretrained:

  OUT_DIR/llama3  Llama 3 split regex (\\p{N}{1,3}), ignore_merges, ByteLevel decoder, a
                  TemplateProcessing post-processor that prepends <|begin_of_text|>, five special tokens
                  after the learned vocabulary, clean_up_tokenization_spaces true (as Llama 3's; transformers
                  5 ignores it for BPE tokenizers, with a warning, so decodes here are not "cleaned up")
  OUT_DIR/qwen2   NFC normalizer, Qwen2 split regex (single \\p{N}), no BOS, <|endoftext|> <|im_start|>
                  <|im_end|> special, <think> </think> added but not special (as Qwen3)
  OUT_DIR/gpt2    the GPT-2 ByteLevel pre-tokenizer (use_regex), <|endoftext|> as bos/eos/unk and a
                  "<mask>" special token with lstrip
  OUT_DIR/o200k   Phi-4's layout: o200k's split regex (GPT-4o's: camel case split, contractions kept with
                  their word, combining marks with letters), ByteLevel without a regex, no BOS, its own
                  vocabulary

With SENTENCEPIECE_MODEL (the Llama-style tokenizer.model libft trains for its parity tests, byte
fallback included), four sentencepiece-style directories too:

  OUT_DIR/llama2         transformers 5's LlamaTokenizer built from that tokenizer.model and saved:
                         tokenizer.json only, Metaspace (prepend_scheme "first", no split), byte
                         fallback, <s> prepended, plus [INST] and [/INST] as special added tokens
  OUT_DIR/llama2_legacy  the same vocabulary in the older layout of Llama 2's own tokenizer.json:
                         Prepend and Replace normalizers, no pre-tokenizer, a Replace, ByteFallback,
                         Fuse, Strip decoder
  OUT_DIR/metaspace_split  Metaspace with prepend_scheme "always" and split, a ByteFallback, Metaspace,
                         Fuse decoder, no BOS
  OUT_DIR/gemma          Gemma's layout: a Replace normalizer only, no prepended "▁"

Two more byte-level directories reuse the llama3 vocabulary with pre-tokenizers that exercise every
Split behaviour and the Digits pre-tokenizer (as some checkpoints' files chain them):

  OUT_DIR/splits_a  Digits (individual), punctuation runs merged with the previous piece, spaces merged
                    with the next, then ByteLevel
  OUT_DIR/splits_b  Digits (contiguous), newlines contiguous, hyphens removed, capitals isolated, then
                    ByteLevel with GPT-2's pattern

Each directory is then loaded back as a user would (transformers.AutoTokenizer.from_pretrained) and
every text of tokenizer_reference.samples(), plus cases that exercise special and added tokens in text,
contractions, digit runs, whitespace runs, Unicode spaces, NFC and a long word, is encoded with and
without special tokens, decoded with and without skip_special_tokens, and converted to tokens. All of it
goes to OUT_DIR/bpe_reference.json (plain ASCII), which the C++ tokenizer must reproduce.

Deterministic: the same bytes every run. Writes only inside OUT_DIR.
"""
import json
import os
import sys

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # everything here is local; never reach for the hub
os.environ.setdefault("TOKENIZERS_PARALLELISM", "true")

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import tokenizer_reference  # noqa: E402  samples() and the fortune / jargon readers

import tokenizers  # noqa: E402
import transformers  # noqa: E402
from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, \
    processors, trainers  # noqa: E402

VOCAB_SIZE = 3000

LLAMA3_PATTERN = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}|"
                  r" ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
QWEN2_PATTERN = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}|"
                 r" ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")

# o200k's split (GPT-4o's; Phi-4's and Phi-4-mini's tokenizer.json): cased words split before a capital
# that follows lower case, contractions after the word, \p{M} with the letters, "/" kept with the
# punctuation's trailing newlines.
O200K_PATTERN = "|".join([
    r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+(?i:'s|'t|'re|'ve|'m|'ll|'d)?",
    r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*(?i:'s|'t|'re|'ve|'m|'ll|'d)?",
    r"\p{N}{1,3}", r" ?[^\s\p{L}\p{N}]+[\r\n/]*", r"\s*[\r\n]+", r"\s+(?!\S)", r"\s+"])

PLAIN_TEXT = "Real Programmers don't write in PASCAL."


def fail(message):
    sys.exit(f"bpe_reference.py: {message}")


def training_text():
    texts = []
    for path in tokenizer_reference.fortune_files():
        texts += tokenizer_reference.fortune_records(path)
    texts += tokenizer_reference.jargon_lines()
    if len(texts) < 1000:
        fail(f"only {len(texts)} training texts: are 'fortunes' and 'jargon-text' installed?")
    return texts


def train(tok, texts):
    trainer = trainers.BpeTrainer(vocab_size=VOCAB_SIZE, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False, special_tokens=[])
    tok.train_from_iterator(texts, trainer=trainer, length=len(texts))
    if tok.get_vocab_size() != VOCAB_SIZE:
        fail(f"trained vocabulary has {tok.get_vocab_size()} tokens, expected {VOCAB_SIZE}")
    return tok


def special(content, **kw):
    return AddedToken(content, special=True, normalized=False, **kw)


def split_byte_level(texts, pattern, ignore_merges):
    """A byte-level BPE trained on `texts` behind a split regex and the byte mapping alone (as Llama 3's
    and Phi-4's tokenizer.json chain them), with the ByteLevel decoder."""
    tok = Tokenizer(models.BPE(ignore_merges=ignore_merges, byte_fallback=False, unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(pattern), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=True, use_regex=False),
    ])
    tok.decoder = decoders.ByteLevel()
    return train(tok, texts)


def build_llama3(texts):
    tok = split_byte_level(texts, LLAMA3_PATTERN, ignore_merges=True)
    names = ["<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"]
    tok.add_special_tokens([special(n) for n in names])
    bos = tok.token_to_id("<|begin_of_text|>")
    tok.post_processor = processors.Sequence([
        processors.ByteLevel(trim_offsets=False),
        processors.TemplateProcessing(single="<|begin_of_text|> $A",
                                      pair="<|begin_of_text|> $A <|begin_of_text|> $B:1",
                                      special_tokens=[("<|begin_of_text|>", bos)]),
    ])
    config = dict(bos_token="<|begin_of_text|>", eos_token="<|end_of_text|>", clean_up_tokenization_spaces=True)
    return tok, config


def build_o200k(texts):
    """Phi-4's layout: o200k's split, the byte mapping alone, its chat markers special, no BOS. Its
    own vocabulary (trained on o200k's pieces), so that its merges span what other splits separate."""
    tok = split_byte_level(texts, O200K_PATTERN, ignore_merges=False)
    tok.add_special_tokens([special(n) for n in ["<|endoftext|>", "<|im_start|>", "<|im_sep|>", "<|im_end|>"]])
    return tok, dict(bos_token=None, eos_token="<|endoftext|>", pad_token="<|endoftext|>")


def build_qwen2(texts):
    tok = Tokenizer(models.BPE(ignore_merges=False, byte_fallback=False, unk_token=None))
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(QWEN2_PATTERN), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    train(tok, texts)
    tok.add_special_tokens([special(n) for n in ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]])
    # As in Qwen3's tokenizer.json: added, not special, not normalized.
    tok.add_tokens([AddedToken(n, special=False, normalized=False) for n in ["<think>", "</think>"]])
    config = dict(bos_token=None, eos_token="<|im_end|>", pad_token="<|endoftext|>",
                  clean_up_tokenization_spaces=False)
    return tok, config


def build_gpt2(texts):
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel()
    train(tok, texts)
    tok.add_special_tokens([special("<|endoftext|>"), special("<mask>", lstrip=True)])
    config = dict(bos_token="<|endoftext|>", eos_token="<|endoftext|>", unk_token="<|endoftext|>",
                  clean_up_tokenization_spaces=False)
    return tok, config


def sentencepiece_variants(model_path, work_dir):
    """The four sentencepiece-style tokenizer.json directories (see the module comment), as
    (name, directory) after writing them."""
    import sentencepiece as spm
    sp = spm.SentencePieceProcessor(model_file=model_path)
    src = os.path.join(work_dir, "sp_source")
    os.makedirs(src, exist_ok=True)
    with open(model_path, "rb") as f, open(os.path.join(src, "tokenizer.model"), "wb") as g:
        g.write(f.read())
    config = dict(add_bos_token=True, add_eos_token=False, legacy=False)
    with open(os.path.join(src, "tokenizer_config.json"), "w") as f:
        json.dump(dict(tokenizer_class="LlamaTokenizer", bos_token="<s>", eos_token="</s>", unk_token="<unk>",
                       **config), f)
    llama, how = tokenizer_reference.llama_tokenizer(src, sp, config)
    llama.add_tokens([AddedToken("[INST]", special=True, normalized=False),
                      AddedToken("[/INST]", special=True, normalized=False)], special_tokens=True)
    out = []
    directory = os.path.join(work_dir, "llama2")
    llama.save_pretrained(directory)
    if os.path.exists(os.path.join(directory, "tokenizer.model")):
        fail("llama2: transformers saved a tokenizer.model; the test needs a directory with tokenizer.json only")
    out.append(("llama2", directory))
    base = Tokenizer.from_file(os.path.join(directory, "tokenizer.json"))
    pre = json.loads(base.to_str())["pre_tokenizer"]
    if pre is None or pre.get("type") != "Metaspace" or pre.get("prepend_scheme") != "first":
        fail(f"llama2: expected transformers 5 to save a Metaspace pre-tokenizer with prepend_scheme first, got {pre}")

    def variant(name, normalizer, pre_tokenizer, decoder, post_processor, **config):
        tok = Tokenizer.from_str(base.to_str())
        tok.normalizer = normalizer
        tok.pre_tokenizer = pre_tokenizer
        tok.decoder = decoder
        tok.post_processor = post_processor
        d = os.path.join(work_dir, name)
        transformers.PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", **config).save_pretrained(d)
        out.append((name, d))

    bos = base.token_to_id("<s>")
    space = "\u2581"
    variant("llama2_legacy",
            normalizers.Sequence([normalizers.Prepend(space), normalizers.Replace(" ", space)]), None,
            decoders.Sequence([decoders.Replace(space, " "), decoders.ByteFallback(), decoders.Fuse(),
                               decoders.Strip(" ", 1, 0)]),
            processors.TemplateProcessing(single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", bos)]),
            bos_token="<s>", eos_token="</s>")
    variant("metaspace_split", None, pre_tokenizers.Metaspace(replacement=space, prepend_scheme="always", split=True),
            decoders.Sequence([decoders.ByteFallback(), decoders.Metaspace(replacement=space, prepend_scheme="always"),
                               decoders.Fuse()]),
            None, bos_token="<s>", eos_token="</s>", add_bos_token=False)
    variant("gemma", normalizers.Replace(" ", space), None,
            decoders.Sequence([decoders.Replace(space, " "), decoders.ByteFallback(), decoders.Fuse()]),
            processors.TemplateProcessing(single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", bos)]),
            bos_token="<s>", eos_token="</s>")
    print(f"sentencepiece-style variants from {model_path} ({how})")
    return out


def sentencepiece_cases():
    return [
        ("sp-inst", "[INST] What is a hacker? [/INST] Someone who enjoys a challenge."),
        ("sp-inst-tight", "[INST]hi[/INST]ok"),
        ("sp-specials-in-text", "<s>Hello</s> world<unk>x"),
        ("sp-metaspace-in-text", "\u2581already \u2581\u2581spaced"),
        ("sp-byte-fallback", "caf\u00e9 \u65e5\u672c \U0001F600 \u0416\u0436"),
        ("sp-leading-newlines", "\n\n  x"),
    ]


def decode_cases(tok):
    """Id lists whose decoding exercises the decoders: byte runs that are and are not valid UTF-8,
    byte tokens between words, a leading "▁" word, a leading special token."""
    ids = lambda *tokens: [tok.convert_tokens_to_ids(t) for t in tokens]  # noqa: E731
    lists = [
        ids("<0xE6>", "<0x97>", "<0xA5>"),
        ids("<0xE6>", "<0x97>"),
        ids("<0xFF>", "<0x41>", "<0xC3>"),
        ids("\u2581a", "<0xC3>", "<0xA9>", "\u2581b"),
        ids("<s>", "\u2581a", "</s>", "\u2581b"),
        ids("\u2581", "\u2581", "a"),
        ids("<0x20>", "a", "<0x0A>"),
    ]
    unk = tok.unk_token_id
    out = []
    for lst in lists:
        if any(i is None or i == unk for i in lst):
            fail(f"decode case {lst}: a token is missing from the vocabulary")
        out.append({"ids": lst, "decoded": tok.decode(lst, skip_special_tokens=True),
                    "decoded_special": tok.decode(lst, skip_special_tokens=False)})
    return out


def split_variants(llama3_dir, out_dir):
    """splits_a and splits_b (see the module comment): the llama3 tokenizer with other pre-tokenizers."""
    out = []
    base = Tokenizer.from_file(os.path.join(llama3_dir, "tokenizer.json"))
    chains = {
        "splits_a": [pre_tokenizers.Digits(individual_digits=True),
                     pre_tokenizers.Split(Regex(r"[.,!?;:]+"), behavior="merged_with_previous"),
                     pre_tokenizers.Split(" ", behavior="merged_with_next"),
                     pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)],
        "splits_b": [pre_tokenizers.Digits(individual_digits=False),
                     pre_tokenizers.Split(Regex(r"\n"), behavior="contiguous"),
                     pre_tokenizers.Split("-", behavior="removed"),
                     pre_tokenizers.Split(Regex(r"[A-Z]"), behavior="isolated"),
                     pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)],
    }
    for name, chain in chains.items():
        tok = Tokenizer.from_str(base.to_str())
        tok.pre_tokenizer = pre_tokenizers.Sequence(chain)
        d = os.path.join(out_dir, name)
        transformers.PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<|begin_of_text|>",
                                             eos_token="<|end_of_text|>").save_pretrained(d)
        out.append((name, d))
    return out


def split_cases():
    return [
        ("split-punct-runs", "Wait... what?! Yes; no: maybe, ok."),
        ("split-spaces", "a  b   c\td"),
        ("split-digits", "In 1984, 2+2=5 and 31337 ~ 0.5"),
        ("split-newlines", "one\n\n\ntwo\nthree\n"),
        ("split-hyphens", "well-known --- x-ray - -"),
        ("split-capitals", "The GNU Emacs HACKER"),
    ]


def o200k_cases():
    return [
        ("o200k-camel-case", "HTTPServer getURLFor iPhone McDonald's XMLHttpRequest"),
        ("o200k-contractions", "DON'T don't I'M we'Ve THEY'LL O'Neil's"),
        ("o200k-marks", "cafe\u0301 n\u0303o \u0915\u093f\u0924\u093e\u092c Ab\u0301C"),
        ("o200k-titlecase", "\u01c5ungla \u01c8j \u02b0Hi"),
        ("o200k-punct-slash", "see a/b/c, x.y/\n/usr/lib//\r\nend"),
    ]


def extra_cases():
    return [
        ("special-chatml", "<|im_start|>user\nhi there<|im_end|>\n"),
        ("special-bos-in-text", "x<|begin_of_text|>y"),
        ("special-mask-lstrip", "a <mask> b  <mask>"),
        ("special-only", "<|endoftext|>"),
        ("added-think", "<think>\nok</think>"),
        ("contractions", "I'LL DON'T we've You'd"),
        ("digit-runs", "1234567890 12 3"),
        ("whitespace-runs", "a   \n\n  b  \t\n"),
        ("spaces-leading-trailing", "  hello world  "),
        ("space-leading-word", " x"),
        ("spaces-only", "   "),
        ("unicode-spaces", "a\u00a0b\u3000c\u2009d\u180ee\u2028f\u0085g"),
        # U+180E has not been White_Space since Unicode 6.3 (\s does not match it); U+2028 is.
        ("mongolian-vowel-separator", "a \u180e\u180e b\u180e"),
        ("line-separator", "a \u2028\u2028 b\u2028"),
        ("nfc-combining", "e\u0301 and \u1100\u1161\u11a8"),
        ("nfc-angstrom", "\u212b"),
        ("long-word", "a" * 300),
        ("private-use-text", "\ue000hello world"),
    ]


def reference(name, directory, cases, sentencepiece_style=False):
    tok = transformers.AutoTokenizer.from_pretrained(directory)
    if not tok.is_fast:
        fail(f"{name}: AutoTokenizer gave a slow tokenizer ({type(tok).__name__})")
    # transformers 5 rebuilds some tokenizer classes' pipelines instead of reading the file's; what
    # libft follows is the file, so the two must agree on every case here.
    raw = Tokenizer.from_file(os.path.join(directory, "tokenizer.json"))
    for source, text in cases:
        a, b = tok(text, add_special_tokens=False)["input_ids"], raw.encode(text, add_special_tokens=False).ids
        if a != b:
            fail(f"{name} {source}: transformers ({type(tok).__name__}) and tokenizers disagree: {a} vs {b}")

    def token_id(i):
        return -1 if i is None else i

    bos, eos = token_id(tok.bos_token_id), token_id(tok.eos_token_id)
    plain = tok(PLAIN_TEXT, add_special_tokens=False)["input_ids"]
    plain_special = tok(PLAIN_TEXT)["input_ids"]
    add_bos = bos != -1 and len(plain_special) > 0 and plain_special[0] == bos and plain[:1] != [bos]
    add_eos = eos != -1 and len(plain_special) > 0 and plain_special[-1] == eos and plain[-1:] != [eos]
    if plain_special != [bos] * add_bos + plain + [eos] * add_eos:
        fail(f"{name}: special-token framing is not BOS/EOS around the text: {plain_special} vs {plain}")

    out_cases = []
    for source, text in cases:
        ids = tok(text, add_special_tokens=False)["input_ids"]
        out_cases.append({
            "source": source,
            "text": text,
            "ids": ids,
            "ids_special": tok(text)["input_ids"],
            "decoded": tok.decode(ids, skip_special_tokens=True),
            "decoded_special": tok.decode(ids, skip_special_tokens=False),
            "tokens": tok.convert_ids_to_tokens(ids),
        })
    return {
        "dir": name,
        "tokenizer_class": type(tok).__name__,
        "vocab_size": len(tok),
        "bos": bos,
        "eos": eos,
        "pad": token_id(tok.pad_token_id),
        "unk": token_id(tok.unk_token_id),
        "add_bos": add_bos,
        "add_eos": add_eos,
        "byte_level": not sentencepiece_style,
        "cases": out_cases,
        "decodes": decode_cases(tok) if sentencepiece_style else [],
    }


def main():
    if len(sys.argv) not in (2, 3):
        sys.exit(f"usage: {sys.argv[0]} OUT_DIR [SENTENCEPIECE_MODEL]")
    out_dir = sys.argv[1]
    os.makedirs(out_dir, exist_ok=True)

    texts = training_text()
    cases = tokenizer_reference.samples() + extra_cases()
    variants = {}
    for name, build in [("llama3", build_llama3), ("qwen2", build_qwen2), ("gpt2", build_gpt2),
                        ("o200k", build_o200k)]:
        tok, config = build(texts)
        directory = os.path.join(out_dir, name)
        os.makedirs(directory, exist_ok=True)
        transformers.PreTrainedTokenizerFast(tokenizer_object=tok, **config).save_pretrained(directory)
        for f in ("tokenizer.json", "tokenizer_config.json"):
            if not os.path.isfile(os.path.join(directory, f)):
                fail(f"{name}: save_pretrained did not write {f}")
        variants[name] = reference(name, directory, cases + (o200k_cases() if name == "o200k" else []))
        v = variants[name]
        print(f"{name}: {len(v['cases'])} cases, vocab size {v['vocab_size']} (bos {v['bos']} eos {v['eos']} "
              f"pad {v['pad']} unk {v['unk']} add_bos {v['add_bos']} add_eos {v['add_eos']})")
    split_cases_all = cases + split_cases()
    for name, directory in split_variants(os.path.join(out_dir, "llama3"), out_dir):
        variants[name] = reference(name, directory, split_cases_all)
        v = variants[name]
        print(f"{name}: {len(v['cases'])} cases, vocab size {v['vocab_size']}")
    if len(sys.argv) == 3:
        sp_cases = tokenizer_reference.samples() + extra_cases() + sentencepiece_cases()
        for name, directory in sentencepiece_variants(sys.argv[2], out_dir):
            variants[name] = reference(name, directory, sp_cases, sentencepiece_style=True)
            v = variants[name]
            print(f"{name}: {len(v['cases'])} cases, {len(v['decodes'])} decodes, vocab size {v['vocab_size']} "
                  f"(bos {v['bos']} eos {v['eos']} unk {v['unk']} add_bos {v['add_bos']} add_eos {v['add_eos']})")

    result = {
        "tokenizers_version": tokenizers.__version__,
        "transformers_version": transformers.__version__,
        "variants": variants,
    }
    path = os.path.join(out_dir, "bpe_reference.json")
    tmp = path + ".tmp"
    with open(tmp, "w", encoding="ascii") as f:
        json.dump(result, f, ensure_ascii=True, indent=1)
    os.replace(tmp, path)
    print(f"wrote {path} (tokenizers {tokenizers.__version__}, transformers {transformers.__version__})")


if __name__ == "__main__":
    try:
        main()
    except SystemExit:
        raise
    except Exception as e:  # any failure: a clear message and a non-zero exit
        import traceback
        traceback.print_exc()
        fail(f"{type(e).__name__}: {e}")
