"""Read and rewrite a bundle's manifest the way a hand editor (or an attacker) would, across format versions.

Versions 2 and 3 keep "tensors" and "initializers" in tables.json (QZ chunks or, from version 3, a deflate stream
when that saves space): `read_manifest` merges them back into one dict; `write_manifest` splits them out again as a
plain tables.json (removing any tables.json.qz or .zlib), updates the manifest's "tables" entry, and — with resign=True — recomputes the manifest checksum,
so a test exercises the field checks rather than only the checksum.
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path


def read_manifest(folder: Path) -> dict:
    m = json.loads((Path(folder) / "manifest.json").read_text())
    if "tables" in m:
        from converter.bundle import _merge_tables      # the loader's own step: tables.json checked, merged in
        _merge_tables(Path(folder), m)
    return m


def split_manifest(m: dict) -> dict[str, bytes | None]:
    """The files that hold `m` (merged form): {name: bytes, or None to delete}."""
    m = dict(m)
    files: dict[str, bytes | None] = {}
    if "tables" in m:
        # (a mutant may have deleted either list: tables.json then lacks it, which loaders must refuse)
        data = json.dumps({k: m.pop(k) for k in ("tensors", "initializers") if k in m}).encode()
        files["tables.json"] = data
        files["tables.json.qz"] = None
        files["tables.json.zlib"] = None
        m["tables"] = {"file": "tables.json", "bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}
    files["manifest.json"] = json.dumps(m).encode()
    return files


def write_manifest(folder: Path, m: dict, resign: bool = True) -> None:
    from converter.bundle import manifest_digest
    folder = Path(folder)
    files = split_manifest(m)
    on_disk = json.loads(files["manifest.json"])
    if resign:
        on_disk["integrity"] = {"sha256": manifest_digest(on_disk)}
    files["manifest.json"] = json.dumps(on_disk).encode()
    for name, data in files.items():
        if data is None:
            (folder / name).unlink(missing_ok=True)
        else:
            (folder / name).write_bytes(data)
