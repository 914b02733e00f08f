#!/usr/bin/env python3
"""Generates the safetensors test corpus in tests/data/safetensors: crafted bad files (bad/), one or
more per rule the reader enforces, and valid files (good/) that seed the fuzzer and the truncation
test. Standard library only, deterministic: re-running it reproduces the checked-in bytes.

The checked-in corpus was made with:

    python3 tests/python/make_bad_safetensors.py tests/data/safetensors

and `--check` (run by ctest as safetensors_corpus_up_to_date) verifies that it still matches:

    python3 tests/python/make_bad_safetensors.py --check tests/data/safetensors

The expected error of each bad file is in tests/test_safetensors.cpp (kBadFiles); the test fails if
a file here has no row there, or a row has no file.

File layout: u64le N | N bytes of JSON header | data buffer.
"""
import argparse
import json
import os
import struct
import sys

# Rank = position in the reference's `enum Dtype` (increasing alignment); bits per element.
DTYPES = {
    "BOOL": (0, 8), "F4": (1, 4), "F6_E2M3": (2, 6), "F6_E3M2": (3, 6), "U8": (4, 8), "I8": (5, 8),
    "F8_E5M2": (6, 8), "F8_E4M3": (7, 8), "F8_E8M0": (8, 8), "F8_E4M3FNUZ": (9, 8),
    "F8_E5M2FNUZ": (10, 8), "I16": (11, 16), "U16": (12, 16), "F16": (13, 16), "BF16": (14, 16),
    "I32": (15, 32), "U32": (16, 32), "F32": (17, 32), "C64": (18, 64), "F64": (19, 64),
    "I64": (20, 64), "U64": (21, 64),
}


def pattern(n, seed=0):
    """n deterministic bytes."""
    return bytes((seed * 31 + i * 7 + 1) & 0xFF for i in range(n))


def raw(header, data=b"", n=None):
    """A file from a header given verbatim (str or bytes): no padding, N = len(header) unless set."""
    if isinstance(header, str):
        header = header.encode("utf-8")
    return struct.pack("<Q", len(header) if n is None else n) + header + data


def valid(tensors, metadata=None):
    """A valid file the way Python's safetensors writes it. tensors: [(name, dtype, shape)]."""
    ordered = sorted(tensors, key=lambda t: (-DTYPES[t[1]][0], t[0]))
    header = {}
    if metadata is not None:
        header["__metadata__"] = metadata
    data = b""
    for i, (name, dtype, shape) in enumerate(ordered):
        numel = 1
        for d in shape:
            numel *= d
        nbytes = numel * DTYPES[dtype][1] // 8
        header[name] = {"dtype": dtype, "shape": list(shape), "data_offsets": [len(data), len(data) + nbytes]}
        data += pattern(nbytes, i)
    text = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
    text += b" " * (-len(text) % 8)
    return raw(text, data)


def entry(dtype="F32", shape=(1,), offsets=(0, 4)):
    return '{"dtype":"%s","shape":%s,"data_offsets":[%d,%d]}' % (
        dtype, json.dumps(list(shape)).replace(" ", ""), offsets[0], offsets[1])


def good_files():
    all_dtypes = []
    for name in DTYPES:
        shape = {"F4": [2, 3], "F6_E2M3": [4], "F6_E3M2": [2, 4]}.get(name, [3])
        all_dtypes.append(("t_" + name.lower(), name, shape))
    return {
        "empty_header.safetensors": valid([]),
        "metadata_only.safetensors": valid([], {"format": "pt"}),
        "basic.safetensors": valid([("a", "F32", [2, 2]), ("b", "I64", [3]), ("c", "U8", [5])], {"format": "pt"}),
        "rank0.safetensors": valid([("scalar", "F64", []), ("flag", "BOOL", [])]),
        "zero_size.safetensors": valid([("empty_rows", "F32", [0, 3]), ("empty_cols", "I32", [2, 0]),
                                        ("x", "F16", [2])]),
        "all_dtypes.safetensors": valid(all_dtypes, {"note": "one tensor of every dtype"}),
        "unicode_names.safetensors": valid([("caf\u00e9.w\u00e8ight", "F32", [1]), ("\u65e5\u672c", "U8", [2]),
                                            ('quote"back\\slash\nnewline', "I8", [1])], {"k\u00e9y": "v\u00e4l"}),
        # JSON whitespace pads either side of the object; keys need not follow offset order.
        "whitespace_padding.safetensors": raw('\t\n { "z" : %s ,\r\n "a" : %s }  \t' % (
            entry("F32", [1], (0, 4)), entry("U8", [2], (4, 6))), pattern(6)),
        # "__metadata__": null is an absent metadata object for the reference (serde Option).
        "metadata_null.safetensors": raw('{"__metadata__":null,"a":%s}' % entry(), pattern(4)),
        # Zero-size tensors at the same offset as a non-empty one.
        "zero_size_shared_offset.safetensors": raw('{"a":%s,"b":%s,"c":%s}' % (
            entry("F32", [0], (0, 0)), entry("F32", [1], (0, 4)), entry("I8", [0, 5], (4, 4))), pattern(4)),
    }


def bad_files():
    e = entry
    d4 = pattern(4)
    deep = 5000
    return {
        # --- the 8-byte length prefix and the header bounds
        "empty.safetensors": b"",
        "short_prefix.safetensors": b"\x10\x00\x00",
        "header_too_large.safetensors": raw("{}", n=100_000_001),
        "header_len_u64_max.safetensors": raw("{}", n=2**64 - 1),
        "header_past_eof.safetensors": raw("{}", n=1000),
        "header_empty.safetensors": raw(""),
        # --- UTF-8
        "non_utf8.safetensors": raw(b'{"a\xff":' + e().encode() + b"}", d4),
        "overlong_utf8.safetensors": raw(b'{"\xc0\xaf":' + e().encode() + b"}", d4),
        "surrogate_utf8.safetensors": raw(b'{"\xed\xa0\x80":' + e().encode() + b"}", d4),
        "above_max_utf8.safetensors": raw(b'{"\xf4\x90\x80\x80":' + e().encode() + b"}", d4),
        "truncated_utf8.safetensors": raw(b'{}    \xe2\x82'),
        "byte_order_mark.safetensors": raw(b"\xef\xbb\xbf{}   "),
        # --- JSON syntax and top-level shape
        "not_json.safetensors": raw("{"),
        "json_array.safetensors": raw("[]"),
        "json_string.safetensors": raw('"tensors"'),
        "json_null.safetensors": raw("null"),
        "trailing_garbage.safetensors": raw("{} x"),
        "nul_padding.safetensors": raw(b"{}\x00\x00\x00\x00\x00\x00"),
        # nlohmann's lexer stops at a NUL byte: what follows must not be ignored.
        "nul_then_garbage.safetensors": raw(b'{"a":%s}\x00{"b":1}' % e().encode(), d4),
        "two_objects.safetensors": raw("{}{}"),
        "comment.safetensors": raw("{/* c */}"),
        "lone_surrogate_escape.safetensors": raw('{"\\ud800":%s}' % e(), d4),
        "raw_control_char.safetensors": raw('{"a\tb":%s}' % e(), d4),
        # --- duplicate keys at every depth (nlohmann, like serde for maps, would keep the last)
        "dup_tensor.safetensors": raw('{"a":%s,"a":%s}' % (e(offsets=(0, 4)), e(offsets=(4, 8))), pattern(8)),
        "dup_field.safetensors": raw('{"a":{"dtype":"F32","dtype":"I32","shape":[1],"data_offsets":[0,4]}}', d4),
        "dup_metadata_key.safetensors": raw('{"__metadata__":{"format":"pt","format":"np"},"a":%s}' % e(), d4),
        "dup_metadata_section.safetensors": raw('{"__metadata__":{"a":"1"},"__metadata__":{"b":"2"},"a":%s}' % e(), d4),
        "dup_key_deep.safetensors": raw('{"a":{"dtype":"F32","shape":[{"x":1,"x":2}],"data_offsets":[0,4]}}', d4),
        # --- dtype
        "unknown_dtype.safetensors": raw('{"a":%s}' % e(dtype="F128"), d4),
        "lowercase_dtype.safetensors": raw('{"a":%s}' % e(dtype="f32"), d4),
        "dtype_not_string.safetensors": raw('{"a":{"dtype":5,"shape":[1],"data_offsets":[0,4]}}', d4),
        # --- shape
        "negative_dim.safetensors": raw('{"a":{"dtype":"F32","shape":[-1,2],"data_offsets":[0,4]}}', d4),
        "minus_zero_dim.safetensors": raw('{"a":{"dtype":"F32","shape":[-0],"data_offsets":[0,0]}}'),
        "float_dim.safetensors": raw('{"a":{"dtype":"F32","shape":[1.0],"data_offsets":[0,4]}}', d4),
        "exponent_dim.safetensors": raw('{"a":{"dtype":"F32","shape":[1e0],"data_offsets":[0,4]}}', d4),
        "string_dim.safetensors": raw('{"a":{"dtype":"F32","shape":["1"],"data_offsets":[0,4]}}', d4),
        "nested_dim.safetensors": raw('{"a":{"dtype":"F32","shape":[[1]],"data_offsets":[0,4]}}', d4),
        "shape_not_array.safetensors": raw('{"a":{"dtype":"F32","shape":1,"data_offsets":[0,4]}}', d4),
        "dim_too_large.safetensors": raw('{"a":{"dtype":"I32","shape":[2,18446744073709551614],"data_offsets":[0,16]}}',
                                         pattern(16)),
        "dim_beyond_u64.safetensors": raw('{"a":{"dtype":"U8","shape":[18446744073709551616],"data_offsets":[0,4]}}', d4),
        # --- sizes
        "size_mismatch.safetensors": raw('{"a.weight":%s}' % e("F32", [2, 4], (0, 12)), pattern(12)),
        "overflow_shape.safetensors": raw('{"a":%s}' % e("F32", [2**62, 2**62], (0, 16)), pattern(16)),
        "overflow_bytes.safetensors": raw('{"a":%s}' % e("F32", [2**62], (0, 16)), pattern(16)),
        "subbyte_misaligned.safetensors": raw('{"a":%s}' % e("F4", [3], (0, 2)), pattern(2)),
        # --- data_offsets
        "begin_gt_end.safetensors": raw('{"a":{"dtype":"F32","shape":[1],"data_offsets":[8,4]}}', pattern(8)),
        "offsets_three.safetensors": raw('{"a":{"dtype":"F32","shape":[1],"data_offsets":[0,4,8]}}', d4),
        "offsets_one.safetensors": raw('{"a":{"dtype":"F32","shape":[1],"data_offsets":[4]}}', d4),
        "offsets_negative.safetensors": raw('{"a":{"dtype":"U8","shape":[4],"data_offsets":[-4,0]}}', d4),
        "offsets_float.safetensors": raw('{"a":{"dtype":"F32","shape":[1],"data_offsets":[0,4.0]}}', d4),
        "offsets_string.safetensors": raw('{"a":{"dtype":"F32","shape":[1],"data_offsets":["0","4"]}}', d4),
        "offsets_object.safetensors": raw('{"a":{"dtype":"F32","shape":[1],"data_offsets":{"begin":0}}}', d4),
        # --- tiling of the data buffer
        "gap.safetensors": raw('{"a":%s,"b":%s}' % (e(offsets=(0, 4)), e(offsets=(8, 12))), pattern(12)),
        "gap_at_start.safetensors": raw('{"a":%s}' % e(offsets=(4, 8)), pattern(8)),
        "overlap.safetensors": raw('{"a":%s,"b":%s}' % (e("F32", [2], (0, 8)), e("F32", [1], (4, 8))), pattern(8)),
        "same_offsets.safetensors": raw('{"a":%s,"b":%s}' % (e(offsets=(0, 4)), e(offsets=(0, 4))), d4),
        "trailing_bytes.safetensors": raw('{"a":%s}' % e(offsets=(0, 4)), pattern(8)),
        "data_without_tensors.safetensors": raw("{}", pattern(8)),
        "offsets_past_eof.safetensors": raw('{"a":%s}' % e("F32", [4], (0, 16)), pattern(8)),
        "offsets_past_eof_huge.safetensors": raw('{"a":%s}' % e("U8", [2**60], (0, 2**60)), d4),
        # --- tensor entries
        "missing_dtype.safetensors": raw('{"a":{"shape":[1],"data_offsets":[0,4]}}', d4),
        "missing_shape.safetensors": raw('{"a":{"dtype":"F32","data_offsets":[0,4]}}', d4),
        "missing_offsets.safetensors": raw('{"a":{"dtype":"F32","shape":[1]}}', d4),
        "entry_not_object.safetensors": raw('{"a":5}'),
        "entry_null.safetensors": raw('{"a":null}'),
        "unknown_field.safetensors": raw('{"a":{"dtype":"F32","shape":[1],"data_offsets":[0,4],"foo":1}}', d4),
        # --- __metadata__
        "metadata_int_value.safetensors": raw('{"__metadata__":{"format":1},"a":%s}' % e(), d4),
        "metadata_nested.safetensors": raw('{"__metadata__":{"k":{"x":"y"}},"a":%s}' % e(), d4),
        "metadata_array.safetensors": raw('{"__metadata__":["format","pt"],"a":%s}' % e(), d4),
        "metadata_string.safetensors": raw('{"__metadata__":"pt","a":%s}' % e(), d4),
        # --- hostile nesting
        "deep_nesting_array.safetensors": raw('{"a":' + "[" * deep + "]" * deep + "}"),
        "deep_nesting_object.safetensors": raw('{"a":' + '{"a":' * deep + "1" + "}" * deep + "}"),
        "deep_nesting_metadata.safetensors": raw('{"__metadata__":{"k":' + "[" * deep + "]" * deep + "}}"),
        "deep_nesting_unclosed.safetensors": raw("[" * deep),
    }


def main():
    here = os.path.dirname(os.path.abspath(__file__))
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("outdir", nargs="?", default=os.path.normpath(os.path.join(here, "..", "data", "safetensors")))
    ap.add_argument("--check", action="store_true", help="compare with OUTDIR instead of writing")
    args = ap.parse_args()

    problems = []
    for sub, files in (("good", good_files()), ("bad", bad_files())):
        folder = os.path.join(args.outdir, sub)
        if args.check:
            present = set(os.listdir(folder)) if os.path.isdir(folder) else set()
            for name in sorted(present - set(files)):
                problems.append(f"{sub}/{name}: not generated by this script")
            for name, data in files.items():
                path = os.path.join(folder, name)
                if not os.path.exists(path):
                    problems.append(f"{sub}/{name}: missing")
                elif open(path, "rb").read() != data:
                    problems.append(f"{sub}/{name}: differs")
            continue
        os.makedirs(folder, exist_ok=True)
        for name, data in files.items():
            with open(os.path.join(folder, name), "wb") as f:
                f.write(data)
        print(f"wrote {len(files)} files to {folder}")
    if problems:
        print("corpus out of date (regenerate with tests/python/make_bad_safetensors.py):", *problems, sep="\n  ")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
