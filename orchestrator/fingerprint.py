"""What a stage's fingerprint is made of, found without running anything.

A fingerprint (the cache key) covers: the kind, its resolved config, every project source file
the kind can execute, the external inputs its config names, and the upstream fingerprints. Its
parts are kept (``Components``) so that a miss can say what changed.

- **Code**: the kind module's imports, followed statically through the AST and transitively
  (function-local imports, ``from workers import x``, ``import workers.a.b``, relative imports
  included), as long as the imported module's file lies under one of the project roots (the
  repository, the pipeline's folder, the working directory); installed packages are not followed.
  A kind adds modules its config names (a ``python`` stage's entrypoint, a reward function).
- **Inputs**: files, folders, globs and URIs a kind declares through ``inputs(config)``: each
  file's content hash when small and local, else its size and modification time.
"""

from __future__ import annotations

import ast
import fnmatch
import glob
import hashlib
import json
import os
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any

from workers import storage

# Local files up to this size are hashed; bigger ones (and remote objects) are known by size+mtime.
_HASH_LIMIT = 4 << 20
# Per-input file lists kept in a cache record for explaining misses; larger ones keep a digest.
_LIST_LIMIT = 64
REPO_ROOT = str(Path(__file__).resolve().parents[1])


@dataclass(frozen=True)
class Components:
    """The parts of a stage's fingerprint, JSON-able (stored in cache records to diff against)."""

    kind: str
    config: dict[str, Any]
    code: dict[str, str]  # source file (relative to its root) -> digest
    inputs: dict[str, dict[str, str]]  # input as named in the config -> {file: signature}
    upstream: dict[str, str] = field(default_factory=dict)  # upstream stage -> its fingerprint

    def as_dict(self) -> dict[str, Any]:
        return {"kind": self.kind, "config": self.config, "code": self.code, "inputs": self.inputs,
                "upstream": dict(sorted(self.upstream.items()))}

    def digest(self) -> str:
        payload = json.dumps(self.as_dict(), sort_keys=True, separators=(",", ":"), default=str)
        return hashlib.sha256(payload.encode()).hexdigest()


def explain(old: dict[str, Any], new: dict[str, Any]) -> list[str]:
    """What differs between two ``Components.as_dict()``: config keys, code files, input files,
    upstream stages (short human-readable lines)."""
    out: list[str] = []
    if old.get("kind") != new.get("kind"):
        out.append(f"kind {old.get('kind')!r} -> {new.get('kind')!r}")
    for key in _changed(_flat(old.get("config", {})), _flat(new.get("config", {}))):
        out.append(f"config key {key}")
    for path in _changed(old.get("code", {}), new.get("code", {})):
        out.append(f"code file {path}")
    old_in, new_in = old.get("inputs", {}), new.get("inputs", {})
    for name in sorted(set(old_in) | set(new_in)):
        files = _changed(old_in.get(name, {}), new_in.get(name, {}))
        out.extend(f"input file {f}" if f != "*" else f"input {name}" for f in files)
    for up in _changed(old.get("upstream", {}), new.get("upstream", {})):
        out.append(f"upstream {up}")
    return out


def _changed(a: dict, b: dict) -> list[str]:
    return sorted(k for k in set(a) | set(b) if a.get(k) != b.get(k))


def _flat(d: Any, prefix: str = "") -> dict[str, str]:
    if not isinstance(d, dict) or not d:
        return {prefix.rstrip("."): json.dumps(d, sort_keys=True, default=str)} if prefix else {}
    out: dict[str, str] = {}
    for k, v in d.items():
        out.update(_flat(v, f"{prefix}{k}."))
    return out


# ---------------------------------------------------------------------------------------------
# Code: static, transitive imports


def code_digests(modules: list[str], roots: list[str]) -> dict[str, str]:
    """{source file: digest} for ``modules`` and every project module they import, transitively."""
    roots = [str(Path(r).resolve()) for r in dict.fromkeys([REPO_ROOT, *roots]) if r and Path(r).is_dir()]
    roots = [r for r in roots if not _installed(r)]
    seen: dict[str, Path] = {}
    todo = list(modules)
    while todo:
        name = todo.pop()
        if name in seen:
            continue
        found = _find(name, roots)
        if found is None:
            continue
        seen[name] = found
        # importing a.b.c runs a/__init__ and a/b/__init__ too
        parts = name.split(".")
        todo.extend(".".join(parts[:i]) for i in range(1, len(parts)))
        todo.extend(_imports(str(found), name, found.name == "__init__.py"))
    out = {}
    for path in sorted(set(seen.values())):
        root = next(r for r in roots if str(path).startswith(r + os.sep))
        out[os.path.relpath(path, root)] = _file_sha(str(path), path.stat().st_mtime_ns)
    return out


def _installed(root: str) -> bool:
    return "site-packages" in root or "dist-packages" in root or Path(root, "os.py").is_file()


def _find(name: str, roots: list[str]) -> Path | None:
    """The file of module ``name`` under the first root that has it (None: not ours)."""
    for root in roots:
        base = Path(root, *name.split("."))
        for candidate in (base / "__init__.py", base.with_suffix(".py")):
            if candidate.is_file():
                return candidate.resolve()
    return None


def _imports(path: str, module: str, is_package: bool) -> list[str]:
    return list(_imports_cached(path, os.stat(path).st_mtime_ns, module, is_package))


@lru_cache(maxsize=4096)
def _imports_cached(path: str, _mtime: int, module: str, is_package: bool) -> tuple[str, ...]:
    """Every module name an import statement anywhere in the file (functions included) may load."""
    try:
        tree = ast.parse(Path(path).read_bytes(), filename=path)
    except SyntaxError:
        return ()
    package = module if is_package else module.rpartition(".")[0]
    names: list[str] = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.extend(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                parts = package.split(".") if package else []
                base_parts = parts[: len(parts) - (node.level - 1)] if node.level > 1 else parts
                base = ".".join(base_parts + ([node.module] if node.module else []))
            else:
                base = node.module or ""
            if base:
                names.append(base)
            # `from pkg import name`: name may be a submodule
            names.extend(f"{base}.{a.name}" if base else a.name for a in node.names if a.name != "*")
    return tuple(names)


@lru_cache(maxsize=4096)
def _file_sha(path: str, _mtime: int) -> str:
    return storage.sha256_file(path)[:16]


# ---------------------------------------------------------------------------------------------
# External inputs: files, folders, globs, URIs


def input_signatures(names: list[str], base_dir: str) -> dict[str, dict[str, str]]:
    """{input: {file: signature}} for the inputs a kind declared (a big listing is one digest)."""
    out: dict[str, dict[str, str]] = {}
    for name in names:
        try:
            files = _list(name, base_dir)
        except OSError as e:  # out of reach from here: validation still works, the run recomputes
            files = {"*": f"unreachable: {type(e).__name__}"}
        if len(files) > _LIST_LIMIT:
            blob = json.dumps(sorted(files.items())).encode()
            files = {"*": f"{len(files)} files, {hashlib.sha256(blob).hexdigest()[:16]}"}
        out[name] = files or {"*": "missing"}
    return out


def _list(name: str, base_dir: str) -> dict[str, str]:
    if storage.is_local(name):
        path = name[len("file://"):] if name.startswith("file://") else name
        path = os.path.expanduser(path)
        if not os.path.isabs(path):  # as the stage will read it: from the working directory, else the pipeline's
            here = os.path.abspath(path)
            path = here if os.path.exists(here) or glob.glob(here) else os.path.join(base_dir, path)
        if glob.has_magic(path):
            paths = sorted(glob.glob(path, recursive=True))
        elif os.path.isdir(path):
            paths = sorted(str(p) for p in Path(path).rglob("*"))
        else:
            paths = [path] if os.path.exists(path) else []
        return {p: _local_sig(p) for p in paths if os.path.isfile(p)}
    fs, path = storage.resolve(name)
    import pyarrow.fs as pafs

    if glob.has_magic(path):
        prefix = path[: min(path.find(c) for c in "*?[" if c in path)].rpartition("/")[0]
        infos = fs.get_file_info(pafs.FileSelector(prefix, recursive=True, allow_not_found=True))
        infos = [i for i in infos if fnmatch.fnmatch(i.path, path)]
    else:
        info = fs.get_file_info(path)
        infos = fs.get_file_info(pafs.FileSelector(path, recursive=True)) if info.type == pafs.FileType.Directory \
            else [info] if info.type == pafs.FileType.File else []
    return {i.path: f"{i.size}:{i.mtime_ns}" for i in infos if i.type == pafs.FileType.File}


def _local_sig(path: str) -> str:
    st = os.stat(path)
    if st.st_size <= _HASH_LIMIT:
        return _file_sha(path, st.st_mtime_ns)
    return f"{st.st_size}:{st.st_mtime_ns}"
