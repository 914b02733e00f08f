#!/usr/bin/env python3
"""Interoperability of libft's safetensors reader/writer with Python's safetensors (the reference).

Run by ctest (tests/CMakeLists.txt) in three steps around the C++ tests:

  write  DIR   Python writes files into DIR (numpy and torch writers, a transformers-style sharded
               checkpoint) and DIR/expect.json describing every tensor (dtype, shape, raw bytes as
               hex). The C++ tests Interop.ReadPythonFiles and friends load them with libft and check
               the bytes; for the byte_identical cases libft also serialises the same tensors and
               metadata and must produce exactly the file Python wrote.
  verify DIR   After the C++ test InteropWrite.WriteForPython has written DIR/from_libft/ with libft,
               Python loads every file there and compares values, dtypes and metadata with what it
               wrote itself, checks byte identity where Python's output is deterministic, and checks
               libft's sharded checkpoint against huggingface_hub's shard split and transformers'
               index format.
  corpus DIR   Cross-checks the crafted corpus (tests/data/safetensors) against the reference reader:
               every good file loads, every bad file is rejected, except the few rules where libft
               is deliberately stricter than the reference (listed below).

Python writes multi-key "__metadata__" objects in hash order, which varies between processes, so
files with more than one metadata key are compared by content, not bytes.
"""
import json
import os
import shutil
import sys

import numpy as np
import safetensors
import safetensors.numpy as stnp
from safetensors import safe_open

try:
    import torch
    import safetensors.torch as stpt
except ImportError:  # numpy-only environments still cover every dtype but BF16 and F8
    torch = None

# Bad corpus files the reference accepts: libft rejects duplicate keys the reference keeps silently
# (serde maps keep the last one) and tensor-entry fields serde ignores.
STRICTER_THAN_REFERENCE = {"dup_metadata_key.safetensors", "unknown_field.safetensors"}

SHARD_LIMIT = 256  # bytes: small enough that the checkpoint below needs several shards
TORCH_DTYPE_NAMES = {}
if torch is not None:
    TORCH_DTYPE_NAMES = {torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
                         torch.float64: "F64", torch.int64: "I64", torch.int32: "I32", torch.int16: "I16",
                         torch.int8: "I8", torch.uint8: "U8", torch.bool: "BOOL",
                         torch.float8_e4m3fn: "F8_E4M3", torch.float8_e5m2: "F8_E5M2"}
NUMPY_DTYPE_NAMES = {np.dtype(v): k for k, v in stnp._TYPES.items()}


def numpy_cases():
    rng = np.random.RandomState(1234)
    f = lambda shape, dt: (rng.standard_normal(shape) * 100).astype(dt)
    i = lambda shape, dt: rng.randint(np.iinfo(dt).min, np.iinfo(dt).max, size=shape, dtype=dt)
    return {
        "numpy_all.safetensors": ({
            "f32": f((2, 3), np.float32), "f64": f((2,), np.float64), "f16": f((2, 2), np.float16),
            "i64": i((4,), np.int64), "i32": i((2, 2), np.int32), "i16": i((3,), np.int16),
            "i8": i((5,), np.int8), "u8": i((7,), np.uint8), "u16": i((3,), np.uint16),
            "u32": i((2,), np.uint32), "u64": i((2,), np.uint64),
            "bool": np.array([True, False, True]), "c64": (f((2,), np.float32) + 1j).astype(np.complex64),
            "model.layers.0.self_attn.q_proj.weight": f((8, 4), np.float32),
        }, {"format": "np"}),
        "numpy_rank0_zero.safetensors": ({
            "scalar_f32": np.array(3.5, np.float32), "scalar_i64": np.array(-7, np.int64),
            "scalar_bool": np.array(True), "empty_f32": np.zeros((0, 4), np.float32),
            "empty_i32": np.zeros((3, 0), np.int32), "empty_1d_u8": np.zeros((0,), np.uint8),
            "after_empty": np.arange(3, dtype=np.int32),
        }, None),
        "numpy_names.safetensors": ({
            'quote"': np.ones(1, np.float32), "back\\slash": np.ones(2, np.float32),
            "new\nline\ttab": np.ones(1, np.int8), "caf\u00e9": np.ones(1, np.uint8),
            "\u65e5\u672c\u8a9e": np.ones(1, np.uint8), "ctl\x01\x1f\x7f": np.ones(1, np.uint8),
            "slash/ok": np.ones(1, np.uint8), "": np.ones(1, np.uint8),
        }, {"n\u00e4me": "v\u00e4l\"ue\n"}),
        "numpy_big.safetensors": ({"w": f((64, 33), np.float32), "b": f((33,), np.float16)}, {"format": "pt"}),
        "numpy_empty.safetensors": ({}, None),
        "numpy_empty_meta.safetensors": ({}, {"format": "pt"}),
        "numpy_multi_meta.safetensors": ({"x": f((3,), np.float32)},
                                         {"format": "pt", "epoch": "3", "note": "multi-key metadata", "z": ""}),
    }


def torch_cases():
    if torch is None:
        return {}
    g = torch.Generator().manual_seed(99)
    r = lambda *shape: torch.randn(*shape, generator=g) * 10
    return {
        "torch_mixed.safetensors": ({
            "bf16": r(3, 4).to(torch.bfloat16), "f16": r(5).to(torch.float16), "f32": r(2, 2),
            "i64": torch.arange(-3, 3, dtype=torch.int64), "bool": torch.tensor([True, False]),
            "f8_e4m3": r(4).to(torch.float8_e4m3fn), "f8_e5m2": r(4).to(torch.float8_e5m2),
            "bf16_scalar": torch.tensor(1.5, dtype=torch.bfloat16),
            "bf16_empty": torch.zeros(0, 2, dtype=torch.bfloat16),
        }, {"format": "pt"}),
    }


def checkpoint_tensors():
    """In state-dict order; one tensor (big) exceeds SHARD_LIMIT to exercise HF's own-shard rule."""
    rng = np.random.RandomState(7)
    return {
        "embed.weight": rng.standard_normal((8, 4)).astype(np.float32),        # 128 B
        "layers.0.norm": rng.standard_normal((16,)).astype(np.float32),        # 64 B
        "layers.0.big": rng.standard_normal((40, 2)).astype(np.float32),       # 320 B > limit
        "layers.0.bias": rng.standard_normal((8,)).astype(np.float16),         # 16 B
        "layers.1.w": rng.standard_normal((20,)).astype(np.float64),           # 160 B
        "layers.1.ids": np.arange(10, dtype=np.int64),                         # 80 B
        "layers.1.scale": np.array(2.0, np.float32),                           # rank 0
        "layers.1.empty": np.zeros((0,), np.float32),                          # zero size
        "lm_head.weight": rng.standard_normal((6, 4)).astype(np.float32),      # 96 B
    }


def raw_bytes(t):
    if torch is not None and isinstance(t, torch.Tensor):
        return t.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()
    return np.ascontiguousarray(t).tobytes()


def describe(tensors):
    out = []
    for name, t in tensors.items():
        if torch is not None and isinstance(t, torch.Tensor):
            dtype = TORCH_DTYPE_NAMES[t.dtype]
        else:
            dtype = NUMPY_DTYPE_NAMES[t.dtype]
        out.append({"name": name, "dtype": dtype, "shape": list(t.shape), "hex": raw_bytes(t).hex()})
    return out


def split(tensors):
    """huggingface_hub's shard split: {filename: [names]}, {name: filename}, total_size."""
    from huggingface_hub.serialization import split_state_dict_into_shards_factory
    s = split_state_dict_into_shards_factory(tensors, get_storage_size=lambda t: t.nbytes,
                                             filename_pattern="model{suffix}.safetensors", max_shard_size=SHARD_LIMIT)
    return s.filename_to_tensors, s.tensor_to_filename, s.metadata["total_size"]


def index_text(tensors, tensor_to_filename, total_size):
    # What transformers' save_pretrained writes (total_parameters: model.num_parameters()).
    total_parameters = sum(int(t.size) for t in tensors.values())
    index = {"metadata": {"total_parameters": total_parameters, "total_size": total_size},
             "weight_map": tensor_to_filename}
    return json.dumps(index, indent=2, sort_keys=True) + "\n"


def save(path, tensors, metadata):
    if tensors and torch is not None and isinstance(next(iter(tensors.values())), torch.Tensor):
        stpt.save_file(tensors, path, metadata=metadata)
    else:
        stnp.save_file(tensors, path, metadata=metadata)


def all_cases():
    return {**numpy_cases(), **torch_cases()}


def cmd_write(outdir):
    if os.path.isdir(outdir):
        shutil.rmtree(outdir)
    os.makedirs(outdir)
    expect = {"safetensors_version": safetensors.__version__, "cases": []}
    for file, (tensors, metadata) in all_cases().items():
        save(os.path.join(outdir, file), tensors, metadata)
        expect["cases"].append({"file": file, "metadata": metadata, "tensors": describe(tensors),
                                "byte_identical": metadata is None or len(metadata) <= 1})

    ckpt = checkpoint_tensors()
    ckpt_dir = os.path.join(outdir, "py_sharded")
    os.makedirs(ckpt_dir)
    by_file, to_file, total = split(ckpt)
    assert len(by_file) > 2, by_file
    for filename, names in by_file.items():
        stnp.save_file({n: ckpt[n] for n in names}, os.path.join(ckpt_dir, filename), metadata={"format": "pt"})
    with open(os.path.join(ckpt_dir, "model.safetensors.index.json"), "w") as f:
        f.write(index_text(ckpt, to_file, total))
    expect["checkpoint"] = {"dir": "py_sharded", "max_shard_bytes": SHARD_LIMIT, "tensors": describe(ckpt)}
    with open(os.path.join(outdir, "expect.json"), "w") as f:
        json.dump(expect, f, indent=1)
    print(f"wrote {len(expect['cases'])} files and a {len(by_file)}-shard checkpoint to {outdir}"
          + ("" if torch is not None else " (torch missing: no BF16/F8 case)"))
    return 0


def same(a, b):
    """Equal dtype, shape and bytes (bytes so that NaN payloads and -0.0 count too)."""
    if torch is not None and isinstance(a, torch.Tensor):
        return a.dtype == b.dtype and a.shape == b.shape and raw_bytes(a) == raw_bytes(b) and (
            a.dtype in (torch.float8_e4m3fn, torch.float8_e5m2) or torch.equal(a, b))
    return a.dtype == b.dtype and a.shape == b.shape and raw_bytes(a) == raw_bytes(b) and np.array_equal(a, b)


def cmd_verify(outdir):
    libft_dir = os.path.join(outdir, "from_libft")
    errors = []
    checked = 0
    for file, (tensors, metadata) in all_cases().items():
        path = os.path.join(libft_dir, file)
        if not os.path.exists(path):
            errors.append(f"{path}: missing (libft did not write it)")
            continue
        framework = "pt" if tensors and torch is not None and isinstance(next(iter(tensors.values())), torch.Tensor) else "np"
        with safe_open(path, framework=framework) as f:
            if set(f.keys()) != set(tensors):
                errors.append(f"{path}: tensors {sorted(f.keys())} != {sorted(tensors)}")
            for name in f.keys():
                if name in tensors and not same(f.get_tensor(name), tensors[name]):
                    errors.append(f"{path}: tensor {name!r} differs from what Python wrote")
            if (f.metadata() or None) != metadata and not (metadata == {} and f.metadata() is None):
                errors.append(f"{path}: metadata {f.metadata()} != {metadata}")
        if metadata is None or len(metadata) <= 1:
            mine = open(path, "rb").read()
            theirs = open(os.path.join(outdir, file), "rb").read()
            if mine != theirs:
                errors.append(f"{path}: {len(mine)} bytes differ from Python's {len(theirs)}-byte file")
        checked += 1

    # The sharded checkpoint libft wrote from the same tensors, in the same order, with the same limit.
    ckpt = checkpoint_tensors()
    ckpt_dir = os.path.join(libft_dir, "ckpt")
    by_file, to_file, total = split(ckpt)
    index_path = os.path.join(ckpt_dir, "model.safetensors.index.json")
    present = sorted(os.listdir(ckpt_dir)) if os.path.isdir(ckpt_dir) else []
    if present != sorted(list(by_file) + ["model.safetensors.index.json"]):
        errors.append(f"{ckpt_dir}: files {present} != huggingface_hub's split {sorted(by_file)} + index")
    elif open(index_path).read() != index_text(ckpt, to_file, total):
        errors.append(f"{index_path}: differs from transformers' json.dumps(index, indent=2, sort_keys=True)")
    else:
        for filename, names in by_file.items():
            shard = os.path.join(ckpt_dir, filename)
            loaded = stnp.load_file(shard)
            if set(loaded) != set(names) or not all(same(loaded[n], ckpt[n]) for n in names):
                errors.append(f"{shard}: tensors differ from huggingface_hub's split")
            if open(shard, "rb").read() != stnp.save({n: ckpt[n] for n in names}, metadata={"format": "pt"}):
                errors.append(f"{shard}: bytes differ from Python's save of the same shard")
        checked += 1
    for e in errors:
        print("FAIL", e)
    print(f"verified {checked} libft-written files/checkpoints in {libft_dir}: {len(errors)} problems")
    return 1 if errors else 0


def cmd_corpus(datadir):
    errors = []
    for sub in ("good", "bad"):
        folder = os.path.join(datadir, sub)
        for name in sorted(os.listdir(folder)):
            data = open(os.path.join(folder, name), "rb").read()
            try:
                safetensors.deserialize(data)
                ok = True
            except Exception:
                ok = False
            expected = sub == "good" or name in STRICTER_THAN_REFERENCE
            if ok != expected:
                errors.append(f"{sub}/{name}: the reference {'accepts' if ok else 'rejects'} it")
    for e in errors:
        print("FAIL", e)
    print(f"corpus cross-checked against safetensors {safetensors.__version__}: {len(errors)} problems")
    return 1 if errors else 0


def main(argv):
    commands = {"write": cmd_write, "verify": cmd_verify, "corpus": cmd_corpus}
    if len(argv) != 3 or argv[1] not in commands:
        print(__doc__)
        return 2
    return commands[argv[1]](os.path.abspath(argv[2]))


if __name__ == "__main__":
    sys.exit(main(sys.argv))
