#!/usr/bin/env python3
"""Reference token ids for libft's sentencepiece tokenizer (TokenizerParity in
tests/data_tests/test_tokenizer.cpp). ctest runs it between the two C++ steps:

  1. TokenizerParity.TrainModel   libft trains DIR/tokenizer.model (2k BPE, byte fallback) on the fortunes
  2. this script, DIR             Python sentencepiece encodes and decodes real text with that model;
                                  transformers' LlamaTokenizer, built from the same tokenizer.model in
                                  checkpoint directories with different add_bos/add_eos settings, encodes
                                  it with special tokens; everything goes to DIR/reference.json
  3. TokenizerParity.MatchesPython  libft must give the same ids, decodes, special ids, framing and
                                  fingerprints

Loading the model libft trained (rather than training one here) tests libft's trainer output as well
as its encoder: a model Python cannot load or encodes differently fails here or in step 3.

The samples are real text (fortunes records, Jargon File lines) plus variants of it that stress
tokenizers: emoji, CJK, combining marks, tabs, CRLF, runs of spaces at either end, the empty string.

Writes only inside DIR (the build tree).
"""
import gzip
import hashlib
import json
import os
import sys
import unicodedata

import sentencepiece as spm
import transformers
from transformers import LlamaTokenizer

FORTUNES = os.environ.get("LIBFT_FORTUNES") or "/usr/share/games/fortunes"
JARGON = os.environ.get("LIBFT_JARGON") or "/usr/share/doc/jargon-text/jargon.txt.gz"


def fortune_files():
    names = []
    for name in sorted(os.listdir(FORTUNES)):
        path = os.path.join(FORTUNES, name)
        # .dat are strfile indexes, .u8 are symlinks, off/ is a directory (when installed).
        if os.path.isfile(path) and not os.path.islink(path) and not name.endswith((".dat", ".u8")):
            names.append(path)
    return names


def fortune_records(path):
    with open(path, encoding="utf-8") as f:
        text = f.read()
    records, lines = [], []
    for line in text.split("\n"):
        if line == "%":
            if lines:
                records.append("\n".join(lines))
            lines = []
        else:
            lines.append(line)
    while lines and lines[-1] == "":  # the newline ending the file
        lines.pop()
    if lines:
        records.append("\n".join(lines))
    return records


def jargon_lines():
    with gzip.open(JARGON, "rt", encoding="utf-8") as f:
        return [line for line in f.read().split("\n") if line.strip()]


def non_ascii(s):
    return any(ord(c) > 127 for c in s)


def samples():
    """(source, text) pairs, in a fixed order."""
    out = []
    all_records = []
    for path in fortune_files():
        name = os.path.basename(path)
        records = fortune_records(path)
        all_records += records
        for i, r in enumerate(records):
            # Every 97th record, and every one with non-ASCII text (accents, dashes, the odd symbol).
            if i % 97 == 0 or non_ascii(r):
                out.append((f"fortunes/{name}#{i}", r))
    lines = jargon_lines()
    for i, line in enumerate(lines):
        # The Jargon File's typography: curly quotes, box drawing, non-breaking spaces, em dashes.
        if i % 211 == 0 or (non_ascii(line) and i % 23 == 0):
            out.append((f"jargon#{i}", line))
    if len(out) < 100:
        sys.exit(f"only {len(out)} samples from {FORTUNES} and {JARGON}: are 'fortunes' and 'jargon-text' installed?")

    overstrike = next(r for r in all_records if "\b" in r)  # nroff-style bold/underline in the fortunes
    longest = max(all_records, key=len)
    line = "Real Programmers don't write in PASCAL."
    first = all_records[0]
    jargon_line = next(l for l in lines if "\u2018" in l)
    edge = [
        ("empty", ""),
        ("space", " "),
        ("tab", "\t"),
        ("newline", "\n"),
        ("crlf", "\r\n"),
        ("spaces-around", "   " + line + "   "),
        ("space-leading", " " + line),
        ("space-trailing", line + " "),
        ("tabs", line.replace(" ", "\t")),
        ("tabs-leading", "\t\t" + line),
        ("crlf-record", first.replace("\n", "\r\n") + "\r\n"),
        ("jargon-indented", jargon_line),
        ("emoji", line + " \U0001F389\U0001F44D\U0001F3FD"),
        ("emoji-leading", "\U0001F999 " + line),
        ("zwj-family", "family: \U0001F468\u200D\U0001F469\u200D\U0001F467 ok"),
        ("cjk", "\u65E5\u672C\u8A9E\u306E\u30C6\u30AD\u30B9\u30C8\u3002" + line),
        ("greek-cyrillic", "\u0395\u03BB\u03BB\u03B7\u03BD\u03B9\u03BA\u03AC and \u0420\u0443\u0441\u0441\u043A\u0438\u0439"),
        ("rtl", "\u05E2\u05D1\u05E8\u05D9\u05EA \u0627\u0644\u0639\u0631\u0628\u064A\u0629"),
        ("combining", unicodedata.normalize("NFD", "caf\u00E9 na\u00EFve") + " vs caf\u00E9"),
        ("fullwidth", "\uFF21\uFF22\uFF23\uFF11\uFF12\uFF13"),
        ("private-use", "\uE000" + line),
        ("nul", "a\x00b"),
        ("digits", "In 1984, 2+2=5 and 3.14159 ~ 22/7."),
        ("overstrike", overstrike),
        ("longest-fortune", longest),
    ]
    return out + edge


def fingerprint(model_bytes, bos, eos, pad, unk, add_bos, add_eos):
    # Must match ft::data::fingerprint_settings and Tokenizer::fingerprint (tokenizer.h).
    settings = (f"libft-tokenizer-v1 bos={bos} eos={eos} pad={pad} unk={unk} "
                f"add_bos={int(add_bos)} add_eos={int(add_eos)}")
    return hashlib.sha256(model_bytes + b"\n" + settings.encode()).hexdigest()


def protobuf_available():
    try:
        import google.protobuf  # noqa: F401  transformers needs it to read tokenizer.model itself
        return True
    except ImportError:
        return False


def llama_tokenizer(directory, sp, config):
    """transformers' LlamaTokenizer for `directory`. from_pretrained converts tokenizer.model with
    protobuf; without it, the same conversion is done here from the sentencepiece vocabulary
    (transformers' SentencePieceExtractor takes the vocabulary in id order and derives BPE merges
    with generate_merges, which is what this does)."""
    if protobuf_available():
        return LlamaTokenizer.from_pretrained(directory), "LlamaTokenizer.from_pretrained"
    from transformers.tokenization_utils_base import generate_merges

    vocab = {sp.id_to_piece(i): i for i in range(sp.get_piece_size())}
    tok = LlamaTokenizer(vocab=vocab, merges=generate_merges(vocab), bos_token="<s>", eos_token="</s>",
                         unk_token="<unk>", add_bos_token=config["add_bos_token"],
                         add_eos_token=config["add_eos_token"], legacy=config["legacy"])
    return tok, "LlamaTokenizer(vocab, merges) (no protobuf for from_pretrained)"


def hf_leading_space_ids(sp, text):
    """transformers' ids for `text` when it starts with a space. sentencepiece always prefixes "▁"
    (add_dummy_prefix); the tokenizers Metaspace pre-tokenizer that LlamaTokenizer uses does not when
    the text already starts with one (legacy or not). So transformers encodes " x" as sentencepiece
    encodes "x", and " " as a lone "▁" (sentencepiece encodes "" as nothing)."""
    assert text.startswith(" ")
    return sp.encode(text[1:], out_type=int) if len(text) > 1 else [sp.piece_to_id("\u2581")]


def main():
    if len(sys.argv) != 2:
        sys.exit(f"usage: {sys.argv[0]} DIR  (DIR holds the tokenizer.model libft trained)")
    out_dir = sys.argv[1]
    model_path = os.path.join(out_dir, "tokenizer.model")
    with open(model_path, "rb") as f:
        model_bytes = f.read()
    sp = spm.SentencePieceProcessor(model_file=model_path)
    assert sp.get_piece_size() == 2000, sp.get_piece_size()
    assert (sp.unk_id(), sp.bos_id(), sp.eos_id(), sp.pad_id()) == (0, 1, 2, -1)

    entries = []
    texts = []
    for source, text in samples():
        ids = sp.encode(text, out_type=int)
        entries.append({"source": source, "text": text, "ids": ids, "decoded": sp.decode(ids)})
        texts.append(text)
        # With identity normalisation and byte fallback, every valid UTF-8 string round-trips.
        assert entries[-1]["decoded"] == text, (source, text, entries[-1]["decoded"])

    def added_token(content):  # how Llama 2's tokenizer_config.json spells a special token
        return {"__type": "AddedToken", "content": content, "lstrip": False, "normalized": False,
                "rstrip": False, "single_word": False}

    configs = {
        "hf_llama": {"legacy": True, "add_bos_token": True, "add_eos_token": False, "bos_token": added_token("<s>"),
                     "eos_token": added_token("</s>"), "unk_token": added_token("<unk>")},
        "hf_bos_eos": {"legacy": False, "add_bos_token": True, "add_eos_token": True, "bos_token": "<s>",
                       "eos_token": "</s>", "unk_token": "<unk>"},
        "hf_eos_only": {"legacy": False, "add_bos_token": False, "add_eos_token": True, "bos_token": "<s>",
                        "eos_token": "</s>", "unk_token": "<unk>"},
    }
    hf = []
    for name, config in configs.items():
        d = os.path.join(out_dir, name)
        os.makedirs(d, exist_ok=True)
        with open(os.path.join(d, "tokenizer.model"), "wb") as f:
            f.write(model_bytes)
        with open(os.path.join(d, "tokenizer_config.json"), "w", encoding="utf-8") as f:
            json.dump({"tokenizer_class": "LlamaTokenizer", **config}, f, indent=2)
        tok, how = llama_tokenizer(d, sp, config)
        bos, eos, add_bos, add_eos = tok.bos_token_id, tok.eos_token_id, config["add_bos_token"], config["add_eos_token"]
        assert (bos, eos, tok.unk_token_id) == (1, 2, 0), (name, bos, eos, tok.unk_token_id)
        ids, divergent = [], []
        for i, (entry, text) in enumerate(zip(entries, texts)):
            framed = tok(text)["input_ids"]
            plain = tok(text, add_special_tokens=False)["input_ids"]
            # The BOS/EOS handling under test: the flags from tokenizer_config.json frame the text.
            assert framed == [bos] * add_bos + plain + [eos] * add_eos, (name, entry["source"], framed, plain)
            if plain != entry["ids"]:
                # The one known difference, and it must be exactly that difference.
                divergent.append(i)
                assert text.startswith(" ") and plain == hf_leading_space_ids(sp, text), (
                    f"{name}: transformers and sentencepiece disagree on {entry['source']} {text!r}:\n"
                    f"  sentencepiece {entry['ids']}\n  transformers  {plain}")
            ids.append(framed)
        pad = tok.pad_token_id if tok.pad_token_id is not None else -1
        hf.append({"dir": name, "loader": how, "bos_token_id": bos, "eos_token_id": eos, "add_bos_token": add_bos,
                   "add_eos_token": add_eos, "fingerprint": fingerprint(model_bytes, bos, eos, pad, tok.unk_token_id,
                                                                        add_bos, add_eos),
                   "ids": ids, "divergent": divergent})
        print(f"{name}: {how}; {len(divergent)} of {len(entries)} samples tokenised differently from "
              f"sentencepiece, all by starting with a space (see hf_leading_space_ids)")

    reference = {
        "sentencepiece_version": spm.__version__,
        "transformers_version": transformers.__version__,
        "model_sha256": hashlib.sha256(model_bytes).hexdigest(),
        "vocab_size": sp.get_piece_size(),
        "samples": entries,
        "hf": hf,
    }
    tmp = os.path.join(out_dir, "reference.json.tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(reference, f, ensure_ascii=True, indent=1)
    os.replace(tmp, os.path.join(out_dir, "reference.json"))
    print(f"wrote {len(entries)} samples (sentencepiece {spm.__version__}, transformers {transformers.__version__}) "
          f"to {os.path.join(out_dir, 'reference.json')}")


if __name__ == "__main__":
    main()
