"""Hostile variants of a valid bundle: each mutant is (label, {file name: new bytes, or None to delete it}).

Byte-level mutants (bit flips, byte runs, truncation, extra bytes, missing files) hit every file; manifest-level
mutants lie about fields (shapes, offsets, counts, scheme names, versions, huge/negative numbers, wrong types) —
in manifest.json, or in tables.json for the tensors and initializers of a version-2 bundle — and, half of the
time, recompute the manifest checksum like a deliberate attacker would, so the field checks themselves are
exercised and not only the checksum.
"""
from __future__ import annotations

import copy
import json
import random
from pathlib import Path
from typing import Iterator

# values no field of a valid manifest can hold where they land (wrong type, negative, huge, empty)
LIES = [2 ** 63, -1, None, [], {}, 10 ** 30, -0.5]
STRING_LIES = ["", "int3", "../etc/passwd"]
# fields for which null is a valid value (a checkpoint without them): null is no lie there
NULLABLE = {"bos_token_id", "rope_scaling", "rope_freq_factors"}
NUMBER_LIES = ["7", True]
# numeric fields whose every value is cross-checked (shapes, offsets, sizes, counts, codes): any change must be caught
STRUCTURAL = {"shape", "chunks", "nbytes", "bytes", "alphabet", "layout", "bias", "blob", "version",
              "hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads", "intermediate_size",
              "vocab_size", "head_dim", "parameters", "runtime_bytes", "blob_bytes", "stored_bytes", "chunk_symbols"}


def _paths(obj, prefix=()):
    """Every (path, value) leaf and container inside a JSON object."""
    yield prefix, obj
    if isinstance(obj, dict):
        for k, v in obj.items():
            yield from _paths(v, prefix + (k,))
    elif isinstance(obj, list):
        for i, v in enumerate(obj):
            yield from _paths(v, prefix + (i,))


def _set(obj, path, value):
    for p in path[:-1]:
        obj = obj[p]
    if value is _DELETE:
        del obj[path[-1]]
    else:
        obj[path[-1]] = value


_DELETE = object()


def mutants(bundle: Path, n: int, seed: int = 0) -> Iterator[tuple[str, dict[str, bytes | None]]]:
    from converter.bundle import manifest_digest

    from manifests import read_manifest, split_manifest

    rng = random.Random(seed)
    # every file, the warm-up model's (warmup/NAME) too
    files = {p.relative_to(bundle).as_posix(): p.read_bytes() for p in sorted(bundle.rglob("*")) if p.is_file()}
    on_disk = json.loads(files["manifest.json"])
    manifest = read_manifest(bundle)        # version 2: tables.json's tensors and initializers merged in
    leaves = [(p, v) for p, v in _paths(manifest) if p and p[0] != "integrity"]
    for i in range(n):
        kind = i % 8
        name = rng.choice(sorted(files))
        data = files[name]
        if kind == 0 and data:                                   # single bit flip
            b = bytearray(data)
            off = rng.randrange(len(b))
            b[off] ^= 1 << rng.randrange(8)
            yield f"{name}: bit flip at {off}", {name: bytes(b)}
        elif kind == 1 and data:                                 # a run of random bytes
            b = bytearray(data)
            off = rng.randrange(len(b))
            run = bytes(rng.randrange(256) for _ in range(rng.randint(2, 64)))
            b[off:off + len(run)] = run
            b = b[:len(data)]
            if bytes(b) == data:                                 # the run happened to equal what was there
                b[off] ^= 0xFF
            yield f"{name}: byte run at {off}", {name: bytes(b)}
        elif kind == 2:                                          # truncation
            cut = rng.randrange(len(data)) if data else 0
            yield f"{name}: truncated to {cut}", {name: data[:cut]}
        elif kind == 3:                                          # extra bytes
            yield f"{name}: extra bytes", {name: data + bytes(rng.randrange(256) for _ in range(rng.randint(1, 32)))}
        elif kind == 4:                                          # missing file
            yield f"{name}: missing", {name: None}
        else:                                                    # a manifest field lies
            m = copy.deepcopy(manifest)
            path, value = rng.choice(leaves)
            resign = kind != 5
            structural = any(p in STRUCTURAL for p in path if isinstance(p, str))
            numeric = isinstance(value, (int, float)) and not isinstance(value, bool)
            if numeric and structural and rng.random() < 0.5:
                new = value + rng.choice([-1, 1, 4, -4096, 2 ** 20])
            elif isinstance(value, str) and path[-1] in ("scheme", "embed_scheme", "dtype", "format", "kind") or \
                    path[-1] in ("file", "name") and path[0] in ("graph", "blobs", "tensors", "initializers"):
                new = rng.choice(LIES + STRING_LIES + [_DELETE])   # names that are cross-checked
            elif numeric:
                new = rng.choice(LIES + NUMBER_LIES + [_DELETE])
            else:
                new = rng.choice(LIES + [_DELETE])
            if new is not _DELETE and new == value and type(new) is type(value) or \
                    new is None and path[-1] in NULLABLE:
                new = "changed"
            _set(m, path, new)
            if path[0] in ("tensors", "initializers") and "tables" in on_disk:
                # the lie goes into tables.json (written plain), its size and hash updated in the manifest
                change = {k: v for k, v in split_manifest(m).items() if v is not None or k in files}
                m = json.loads(change["manifest.json"])
            else:
                change = {}
                if "tables" in on_disk:
                    m = {k: v for k, v in m.items() if k not in ("tensors", "initializers")}
            if resign:
                m["integrity"] = {"sha256": manifest_digest(m)}
            label = f"manifest {'/'.join(map(str, path))} = {new if new is not _DELETE else '<deleted>'!r:.40}" + \
                    (" (checksum recomputed)" if resign else "")
            yield label, {**change, "manifest.json": json.dumps(m).encode()}
