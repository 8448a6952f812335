"""What a stage's fingerprint is made of, found without running anything.

A fingerprint (the cache key) covers the kind, its resolved config, the code it can execute,
the inputs its config names, the environment variables it declares, the versions of Python and
of the packages that change its numbers, and the upstream fingerprints. Its parts are kept
(``Components``) so that a miss can say what changed.

- **Code**: the kind module and the modules its config names, with their imports followed
  statically through the AST and transitively (function-local imports, ``from workers import
  x``, relative imports included). A module is found as an import would find it: the project's
  own packages (``orchestrator``, ``workers``) where they are loaded from, wherever that is (a
  checkout, or ``site-packages`` after ``pip install .``); any other module in the pipeline's
  folder, the working directory, then ``sys.path`` (``PYTHONPATH`` included), in that order.
  Modules found in the standard library or in ``site-packages``/``dist-packages`` (third-party
  packages) are not followed: their versions stand for them (below). A file is named by its
  module path (``workers/model/transformer.py``, ``mymodule.py``) and known by its content.
- **Modules named in the config**: a config string that is a module reference,
  ``module:function`` or a (dotted) module name, is followed like an import when it resolves to
  a module that would be followed (a ``python`` stage's entrypoint, a reward function, a module
  its params name for ``importlib``).
- **Inputs**: every string of the resolved config (nested mappings and lists walked) that names
  - a URI of a supported store (``s3://``, ``gs://``, ``gcs://``, ``hdfs://``, ``viewfs://``,
    ``file://``): always an input (``missing`` when nothing is there);
  - an existing local file, folder or glob match: a relative path names what is in the working
    directory if anything is there, else what is in the pipeline's folder (as the kinds resolve
    paths; ``~`` expanded). A plain word that happens to name a file there is an input too: a
    needless miss at worst, never a stale hit;
  except a string equal to the name of one of the stage's upstreams (the upstream's fingerprint
  stands for it), ``builtin:`` data (part of the code), and strings with a line break or longer
  than 4096 characters (text, not paths). A kind's ``inputs(config)`` adds what its config
  cannot show (a ``python`` stage's ``inputs: [...]``); those are recorded even when missing.
  A kind's ``untracked(config)`` names config keys whose strings are not inputs (a ``python``
  stage's ``untracked: [params.log_dir]``: folders it writes to or signals through).
  A folder is listed recursively, leaving out ``__pycache__`` and the pipeline's storage root
  (which holds the stage's own outputs). Each local file is known by its content hash up to
  4 MiB, else by size and modification time; a remote object by size and modification time.
- **Environment variables** a kind declares (``env(config)``; a ``python`` stage's ``env:``):
  each one's value as a salted PBKDF2 digest (never the value), or ``unset``.
- **Versions**: the Python implementation and version, and the installed versions of the
  packages in ``NUMERIC_PACKAGES`` that the stage's followed code imports (read from package
  metadata, not by importing them). ``ORCHESTRATOR_FAKE_VERSIONS`` (``torch=2.14.1,python=X``)
  overrides observed versions: a test stand-in for an upgrade, read only here.

Not covered: environment variables not declared; files read by code at paths the config never
names; third-party packages other than ``NUMERIC_PACKAGES`` (and those are known by version,
not content); edits to a remote object, or a >4 MiB local file, that keep its size and
modification time; values as the stage's node sees them (variables and local paths are read on
the driver, where the plan is made).
"""

from __future__ import annotations

import ast
import fnmatch
import glob
import hashlib
import importlib.metadata
import importlib.util
import json
import os
import platform
import re
import sys
import sysconfig
import time
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any, Iterator

from workers import storage

# Local files up to this size are hashed; bigger ones (and remote objects) are known by size+mtime.
_HASH_LIMIT = 4 << 20
# Per-input file lists kept in a cache record for explaining misses; larger ones keep a digest.
_LIST_LIMIT = 64
# Config strings longer than this, or with a line break, are text (a prompt, a template), not paths.
_PATH_LIMIT = 4096
REPO_ROOT = str(Path(__file__).resolve().parents[1])
PROJECT_PACKAGES = ("orchestrator", "workers")
NUMERIC_PACKAGES = ("numpy", "peft", "tokenizers", "torch", "transformers", "trl")
"""Packages whose version changes a stage's numbers: each joins the key of the stages whose
code imports it."""
FAKE_VERSIONS_ENV = "ORCHESTRATOR_FAKE_VERSIONS"
_MODULE_REF = re.compile(r"^([A-Za-z_]\w*(?:\.[A-Za-z_]\w*)*)(?::[A-Za-z_]\w*)?$")


@dataclass(frozen=True)
class Components:
    """The parts of a stage's fingerprint, JSON-able (stored in cache records to diff against)."""

    kind: str
    config: dict[str, Any]
    code: dict[str, str]  # source file (its module path) -> digest
    inputs: dict[str, dict[str, str]]  # input as named in the config -> {file: signature}
    upstream: dict[str, str] = field(default_factory=dict)  # upstream stage -> its fingerprint
    env: dict[str, str] = field(default_factory=dict)  # declared variable -> digest of its value
    versions: dict[str, str] = field(default_factory=dict)  # "python" / package -> version

    def as_dict(self) -> dict[str, Any]:
        return {"kind": self.kind, "config": self.config, "code": self.code, "inputs": self.inputs,
                "upstream": dict(sorted(self.upstream.items())), "env": dict(sorted(self.env.items())),
                "versions": dict(sorted(self.versions.items()))}

    def digest(self) -> str:
        payload = json.dumps(self.as_dict(), sort_keys=True, separators=(",", ":"), default=str)
        return hashlib.sha256(payload.encode()).hexdigest()


def explain(old: dict[str, Any], new: dict[str, Any]) -> list[str]:
    """What differs between two ``Components.as_dict()``: config keys, code files, input files,
    environment variables (by name), Python and package versions, upstream stages (short lines)."""
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
    for name in _changed(old.get("env", {}), new.get("env", {})):
        out.append(f"env var {name}")
    if "versions" not in old:
        out.append("environment: not recorded (a record from an older orchestrator)")
    else:
        old_v, new_v = old["versions"], new.get("versions", {})
        for pkg in _changed(old_v, new_v):
            out.append(f"environment: {pkg} {old_v.get(pkg, 'not used')} -> {new_v.get(pkg, 'not used')}")
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
# A stage's parts, from its validated config


def stage_parts(kind_module: Any, cfg: Any, *, upstreams: set[str], roots: list[str],
                storage_root: str | None = None) -> dict[str, Any]:
    """{"config", "code", "inputs", "env", "versions"} of a stage whose config validated as
    ``cfg`` (an instance of ``kind_module.Config``). ``roots``: the pipeline's folder, then the
    working directory."""
    config = cfg.model_dump(mode="json")
    untracked = getattr(kind_module, "untracked", lambda c: [])(cfg)
    found_inputs, found_modules = scan_config(config, upstreams=upstreams, roots=roots, untracked=untracked)
    declared = [x for x in _flatten(getattr(kind_module, "inputs", lambda c: [])(cfg))
                if x not in upstreams and not x.startswith("builtin:")]
    modules = [kind_module.__name__, *getattr(kind_module, "modules", lambda c: [])(cfg), *found_modules]
    code, imported = scan_code(modules, roots)
    exclude = [storage.resolve(storage_root)[1]] if storage_root and storage.is_local(storage_root) else []
    inputs = input_signatures(declared, roots, exclude=exclude)
    inputs.update(input_signatures([x for x in found_inputs if x not in inputs], roots, exclude=exclude,
                                   found=True))
    return {"config": config, "code": code, "inputs": dict(sorted(inputs.items())),
            "env": env_digests(getattr(kind_module, "env", lambda c: [])(cfg)),
            "versions": versions(imported)}


def _flatten(items: Any) -> list[str]:
    """A kind's declared inputs as a flat list of strings (None left out)."""
    if items is None:
        return []
    if isinstance(items, str):
        return [items]
    return [x for item in items for x in _flatten(item)]


def config_strings(config: Any, path: str = "config") -> Iterator[tuple[str, str]]:
    """(YAML path, value) of every string in a resolved config, nested mappings and lists walked."""
    if isinstance(config, str):
        yield path, config
    elif isinstance(config, dict):
        for k, v in config.items():
            yield from config_strings(v, f"{path}.{k}")
    elif isinstance(config, (list, tuple)):
        for i, v in enumerate(config):
            yield from config_strings(v, f"{path}[{i}]")


def scan_config(config: Any, *, upstreams: set[str], roots: list[str],
                untracked: list[str] = ()) -> tuple[list[str], list[str]]:
    """(inputs, modules) the strings of ``config`` name, by the rules of this module's docstring;
    ``untracked``: config keys (``params.log_dir``) whose strings are left out."""
    inputs: list[str] = []
    modules: list[str] = []
    finder = _Finder(roots)
    skip = tuple(f"config.{key}" for key in untracked)
    for where, s in config_strings(config):
        if any(where == k or where.startswith((k + ".", k + "[")) for k in skip):
            continue
        if (not s.strip() or s in upstreams or s.startswith("builtin:") or "\n" in s or "\r" in s
                or "\0" in s or len(s) > _PATH_LIMIT):
            continue
        ref = _MODULE_REF.match(s)
        if ref and finder.locate(ref.group(1)) is not None:
            modules.append(ref.group(1))
        if not storage.is_local(s) or s.startswith("file://"):
            inputs.append(s)
        elif _local_paths(s, roots):
            inputs.append(s)
    return list(dict.fromkeys(inputs)), list(dict.fromkeys(modules))


# ---------------------------------------------------------------------------------------------
# Code: static, transitive imports


def code_digests(modules: list[str], roots: list[str]) -> dict[str, str]:
    """{source file: digest} for ``modules`` and every module they import that is followed."""
    return scan_code(modules, roots)[0]


def scan_code(modules: list[str], roots: list[str]) -> tuple[dict[str, str], set[str]]:
    """({source file: digest} of ``modules`` and the modules they import, transitively, that are
    followed; the top-level names of the imported modules that are not: third-party, stdlib)."""
    finder = _Finder(roots)
    seen: dict[str, Path] = {}
    external: set[str] = set()
    todo = list(modules)
    done: set[str] = set()
    while todo:
        name = todo.pop()
        if name in done:
            continue
        done.add(name)
        found = finder.locate(name)
        if found is None:
            external.add(name.split(".")[0])
            continue
        seen[name] = found
        # importing a.b.c runs a/__init__ and a/b/__init__ too
        parts = name.split(".")
        todo.extend(".".join(parts[:i]) for i in range(1, len(parts)))
        todo.extend(_imports(str(found), name, found.name == "__init__.py"))
    out = {}
    for name, path in sorted(seen.items(), key=lambda kv: str(kv[1])):
        key = "/".join(name.split(".")) + ("/__init__.py" if path.name == "__init__.py" else ".py")
        out[key] = _content_sig(str(path))
    followed_tops = {n.split(".")[0] for n in seen}
    return dict(sorted(out.items())), external - followed_tops


class _Finder:
    """Finds modules as an import would, for one stage's plan (what it learns is kept that long)."""

    def __init__(self, roots: list[str]) -> None:
        paths = [os.path.abspath(p or os.curdir) for p in [*roots, *sys.path] if isinstance(p, str)]
        self.search = tuple(p for p in dict.fromkeys(paths) if os.path.isdir(p))
        self._tops: dict[str, str | None] = {}

    def locate(self, name: str) -> Path | None:
        """The source file of module ``name`` when it is followed (None: not found, or
        third-party or stdlib), inside the folder that holds its top-level module."""
        parts = name.split(".")
        if parts[0] not in self._tops:
            self._tops[parts[0]] = self._top_root(parts[0])
        root = self._tops[parts[0]]
        if root is None:
            return None
        full = os.path.join(root, *parts)
        for candidate in (os.path.join(full, "__init__.py"), full + ".py"):
            if os.path.isfile(candidate):
                return Path(candidate)
        return None

    def _top_root(self, top: str) -> str | None:
        if top in sys.builtin_module_names:
            return None
        if top in PROJECT_PACKAGES:
            return project_root(top)
        for root in self.search:
            if os.path.isfile(os.path.join(root, top, "__init__.py")) or os.path.isfile(os.path.join(root, top + ".py")):
                return None if third_party(root) else root
        return None


def project_root(package: str) -> str | None:
    """The folder holding the project package ``package`` as this process loads it."""
    module = sys.modules.get(package)
    origin = getattr(module, "__file__", None)
    if origin is None:
        spec = importlib.util.find_spec(package)
        origin = spec.origin if spec else None
    return str(Path(origin).resolve().parents[1]) if origin else None


@lru_cache(maxsize=1)
def _third_party_dirs() -> tuple[str, ...]:
    paths = sysconfig.get_paths()
    dirs = {paths[k] for k in ("stdlib", "platstdlib", "purelib", "platlib") if k in paths}
    return tuple(os.path.join(os.path.realpath(d), "") for d in dirs)


@lru_cache(maxsize=8192)
def third_party(path: str) -> bool:
    """Whether ``path`` lies in the standard library or an installed packages' folder."""
    real = os.path.realpath(path)
    parts = real.split(os.sep)
    return "site-packages" in parts or "dist-packages" in parts or os.path.join(real, "").startswith(_third_party_dirs())


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


def _content_sig(path: str) -> str:
    """A small file's content digest. Digests are remembered per (file, mtime, size) only once the
    file is 2 s old: an edit in the same clock tick as the last one keeps the mtime (racy-git)."""
    st = os.stat(path)
    if time.time_ns() - st.st_mtime_ns < 2_000_000_000:
        return storage.sha256_file(path)[:16]
    return _file_sha(path, st.st_mtime_ns, st.st_size)


@lru_cache(maxsize=4096)
def _file_sha(path: str, _mtime: int, _size: int) -> str:
    return storage.sha256_file(path)[:16]


# ---------------------------------------------------------------------------------------------
# Environment: declared variables, Python and package versions


def env_digests(names: list[str]) -> dict[str, str]:
    """{variable: digest of its value, or "unset"}: values may be secrets, so never kept."""
    return {n: _secret_digest(n, os.environ[n]) if n in os.environ else "unset" for n in sorted(set(names))}


@lru_cache(maxsize=64)
def _installed_version(pkg: str) -> str:
    try:
        return importlib.metadata.version(pkg)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


@lru_cache(maxsize=256)
def _secret_digest(name: str, value: str) -> str:
    # salted and slow: a cache record must not give a short secret back to a guesser cheaply
    return hashlib.pbkdf2_hmac("sha256", value.encode(), b"genai-orchestrator env:" + name.encode(), 100_000).hex()[:16]


def versions(imported: set[str]) -> dict[str, str]:
    """Python's implementation and version, and the installed version of each of
    ``NUMERIC_PACKAGES`` in ``imported`` (overridden by ``ORCHESTRATOR_FAKE_VERSIONS``)."""
    out = {"python": f"{platform.python_implementation()} {platform.python_version()}"}
    out.update({pkg: _installed_version(pkg) for pkg in NUMERIC_PACKAGES if pkg in imported})
    for item in filter(None, os.environ.get(FAKE_VERSIONS_ENV, "").split(",")):
        pkg, _, version = item.partition("=")
        if pkg.strip() in out:
            out[pkg.strip()] = version.strip()
    return out


# ---------------------------------------------------------------------------------------------
# External inputs: files, folders, globs, URIs


def input_signatures(names: list[str], roots: list[str] | str, *, exclude: list[str] = (),
                     found: bool = False) -> dict[str, dict[str, str]]:
    """{input: {file: signature}} for inputs (a big listing is one digest). ``roots``: the
    pipeline's folder (then the working directory); ``exclude``: folders never listed."""
    roots = [roots] if isinstance(roots, str) else roots
    out: dict[str, dict[str, str]] = {}
    for name in names:
        try:
            files = _list(name, roots, exclude)
        except OSError as e:  # out of reach from here: validation still works, the run recomputes
            files = {"*": f"unreachable: {type(e).__name__}"}
        if len(files) > _LIST_LIMIT:
            blob = json.dumps(sorted(files.items())).encode()
            files = {"*": f"{len(files)} files, {hashlib.sha256(blob).hexdigest()[:16]}"}
        if files or not found or not storage.is_local(name) or name.startswith("file://"):
            out[name] = files or {"*": "missing"}
    return out


def _local_paths(name: str, roots: list[str]) -> list[str]:
    """What a local path, folder or glob names: relative ones from the working directory when
    something is there, else from the pipeline's folder (``roots[0]``)."""
    path = os.path.expanduser(name[len("file://"):] if name.startswith("file://") else name)
    candidates = [path] if os.path.isabs(path) else [os.path.abspath(path), os.path.join(roots[0], path)]
    for p in candidates:
        if glob.has_magic(p):
            hits = sorted(glob.glob(p, recursive=True))
            if hits:
                return hits
        elif os.path.exists(p):
            return [p]
    return []


def _list(name: str, roots: list[str], exclude: list[str]) -> dict[str, str]:
    if storage.is_local(name):
        skip = {os.path.realpath(e) for e in exclude}
        files: list[str] = []
        for p in _local_paths(name, roots):
            if os.path.isdir(p):
                for dirpath, dirnames, filenames in os.walk(p):
                    dirnames[:] = sorted(d for d in dirnames if d != "__pycache__"
                                         and os.path.realpath(os.path.join(dirpath, d)) not in skip)
                    files.extend(os.path.join(dirpath, f) for f in sorted(filenames))
            elif os.path.isfile(p):
                files.append(p)
        return {p: _local_sig(p) for p in files if os.path.isfile(p)}
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
        return _content_sig(path)
    return f"{st.st_size}:{st.st_mtime_ns}"
