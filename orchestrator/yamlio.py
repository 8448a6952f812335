"""Loading pipeline YAML strictly: syntax errors with line and column, duplicate keys refused,
UTF-8 only, and bounded: the node graph is measured with its aliases expanded (memoised, so
measuring costs the graph's size, not the expansion's) before anything is built from it, so an
alias bomb is refused at once and a recursive alias is an error, not a ``RecursionError``."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from .errors import SpecError


class _StrictLoader(yaml.SafeLoader):
    """SafeLoader that refuses duplicate mapping keys (plain YAML keeps the last one silently)."""


def _construct_mapping(loader: _StrictLoader, node: yaml.MappingNode, deep: bool = False) -> dict:
    loader.flatten_mapping(node)
    seen: dict[Any, yaml.Node] = {}
    for key_node, _ in node.value:
        key = loader.construct_object(key_node, deep=deep)
        if key in seen:
            first = seen[key].start_mark
            mark = key_node.start_mark
            raise SpecError(
                f"duplicate key {key!r} at line {mark.line + 1}, column {mark.column + 1} "
                f"(first defined at line {first.line + 1}); each key may appear once in a mapping"
            )
        seen[key] = key_node
    return loader.construct_mapping(node, deep=deep)


_StrictLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _construct_mapping)


MAX_FILE_BYTES = 4 * 2**20
"""A pipeline file is a few KiB; a bigger one is not a pipeline."""
MAX_NODES = 100_000
"""Scalars, sequences and mappings after alias expansion (a pipeline has hundreds)."""
MAX_DEPTH = 64
"""Nesting of sequences and mappings (a pipeline nests a handful deep)."""


def _measure(root: yaml.Node) -> None:
    """Refuse a node graph that expands past MAX_NODES or MAX_DEPTH, or that contains itself."""
    sizes: dict[int, int] = {}
    on_path: set[int] = set()

    def size(node: yaml.Node, depth: int) -> int:
        if id(node) in on_path:
            mark = node.start_mark
            raise SpecError(f"recursive alias at line {mark.line + 1}, column {mark.column + 1}: a node that "
                            "contains itself cannot be loaded")
        if depth > MAX_DEPTH:
            mark = node.start_mark
            raise SpecError(f"nested more than {MAX_DEPTH} levels deep at line {mark.line + 1}")
        if id(node) in sizes:
            return sizes[id(node)]
        on_path.add(id(node))
        if isinstance(node, yaml.SequenceNode):
            children = node.value
        elif isinstance(node, yaml.MappingNode):
            children = [n for pair in node.value for n in pair]
        else:
            children = []
        total = 1 + sum(size(child, depth + 1) for child in children)
        on_path.discard(id(node))
        if total > MAX_NODES:
            mark = node.start_mark
            raise SpecError(f"the node at line {mark.line + 1} expands to more than {MAX_NODES} values "
                            "(aliases included); refused (an alias bomb?)")
        sizes[id(node)] = total
        return total

    size(root, 0)


# PyYAML's scanner is quadratic in the nesting of [ and {: a file of 100k "[" scans for hours.
# Brackets are counted in the raw text (quotes ignored, so only ever more than the real depth)
# and refused far above MAX_DEPTH, where the scanner still takes milliseconds.
_MAX_FLOW_BRACKETS = 200


def _flow_depth(text: str) -> int:
    depth = most = 0
    for ch in text:
        if ch in "[{":
            depth += 1
            most = max(most, depth)
        elif ch in "]}" and depth:
            depth -= 1
    return most


def load_yaml_text(text: str, source: str = "<string>") -> Any:
    if len(text) > MAX_FILE_BYTES:
        raise SpecError(f"{len(text)} characters; a pipeline file may have at most {MAX_FILE_BYTES}", source=source)
    if _flow_depth(text) > _MAX_FLOW_BRACKETS:
        raise SpecError(f"nested more than {MAX_DEPTH} levels deep ([ and {{ nest over {_MAX_FLOW_BRACKETS} deep)",
                        source=source)
    loader = _StrictLoader(text)
    try:
        node = loader.get_single_node()
        if node is None:
            return None
        _measure(node)
        return loader.construct_document(node)
    except RecursionError:
        raise SpecError(f"nested too deeply (more than {MAX_DEPTH} levels)", source=source) from None
    except SpecError as e:
        raise SpecError(e.problems, source=source) from None
    except yaml.MarkedYAMLError as e:
        mark = e.problem_mark or e.context_mark
        where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark else ""
        raise SpecError(f"YAML syntax error at {where}{e.problem or e}", source=source) from None
    except yaml.YAMLError as e:
        raise SpecError(f"YAML syntax error: {e}", source=source) from None
    finally:
        loader.dispose()


def load_yaml_file(path: str | Path) -> Any:
    p = Path(path)
    if not p.exists():
        raise SpecError(f"pipeline file not found: {str(path)!r}")
    if p.is_dir():
        raise SpecError(f"pipeline file {str(path)!r} is a directory; pass a .yaml file")
    try:
        if p.stat().st_size > MAX_FILE_BYTES:
            raise SpecError(f"{p.stat().st_size} bytes; a pipeline file may have at most {MAX_FILE_BYTES}",
                            source=str(path))
        data = p.read_bytes()
    except OSError as e:
        raise SpecError(f"cannot read {str(path)!r}: {e.strerror}") from None
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        line = data[:e.start].count(b"\n") + 1
        raise SpecError(f"not UTF-8 text: byte {data[e.start]:#04x} at line {line} (offset {e.start}); save the "
                        "file as UTF-8", source=str(path)) from None
    return load_yaml_text(text, source=str(path))
