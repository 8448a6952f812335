"""Loading pipeline YAML strictly: syntax errors with line and column, duplicate keys refused."""

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


def load_yaml_text(text: str, source: str = "<string>") -> Any:
    try:
        return yaml.load(text, Loader=_StrictLoader)  # noqa: S506 - SafeLoader subclass
    except SpecError as e:
        raise SpecError(e.problems, source=source) from None
    except yaml.MarkedYAMLError as e:
        mark = e.problem_mark or e.context_mark
        where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark else ""
        raise SpecError(f"YAML syntax error at {where}{e.problem or e}", source=source) from None
    except yaml.YAMLError as e:
        raise SpecError(f"YAML syntax error: {e}", source=source) from None


def load_yaml_file(path: str | Path) -> Any:
    p = Path(path)
    if not p.exists():
        raise SpecError(f"pipeline file not found: {str(path)!r}")
    if p.is_dir():
        raise SpecError(f"pipeline file {str(path)!r} is a directory; pass a .yaml file")
    return load_yaml_text(p.read_text(encoding="utf-8"), source=str(path))
