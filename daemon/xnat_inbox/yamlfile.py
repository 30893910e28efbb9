"""Load a YAML file and validate it with pydantic, so every error names file, line and key."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, TypeVar

import yaml
from pydantic import BaseModel, ValidationError

Model = TypeVar("Model", bound=BaseModel)
KeyPath = tuple[str | int, ...]


class ConfigError(Exception):
    """A config or route file is unusable; the message says where and what is expected."""


def load_yaml(path: Path, content: bytes | None = None) -> tuple[Any, dict[KeyPath, int]]:
    """Parse `path` (its `content` when already read); return the data and the line number of
    every key in it."""
    try:
        text = (path.read_bytes() if content is None else content).decode("utf-8")
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read the file ({exc.strerror}).") from None
    except UnicodeDecodeError:
        raise ConfigError(f"{path}: not UTF-8 text; save it as UTF-8 YAML.") from None
    try:
        node = yaml.compose(text, Loader=yaml.SafeLoader)
        data = yaml.safe_load(text)
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        where = f"{path}:{mark.line + 1}" if mark else str(path)
        raise ConfigError(f"{where}: invalid YAML: {exc.problem or exc.context}.") from None
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: invalid YAML: {exc}.") from None
    lines: dict[KeyPath, int] = {}
    if node is not None:
        _record_lines(node, (), lines)
    return data, lines


def _record_lines(node: yaml.Node, prefix: KeyPath, lines: dict[KeyPath, int]) -> None:
    lines.setdefault(prefix, node.start_mark.line + 1)
    if isinstance(node, yaml.MappingNode):
        for key_node, value_node in node.value:
            key = (*prefix, str(key_node.value))
            lines[key] = key_node.start_mark.line + 1
            _record_lines(value_node, key, lines)
    elif isinstance(node, yaml.SequenceNode):
        for index, item in enumerate(node.value):
            _record_lines(item, (*prefix, index), lines)


def validate(
    model: type[Model],
    data: Any,
    path: Path,
    lines: Mapping[KeyPath, int],
    context: Mapping[str, Any] | None = None,
) -> Model:
    """Validate `data` as `model`; a failure becomes one ConfigError listing every problem."""
    if data is None:
        data = {}
    if not isinstance(data, Mapping):
        raise ConfigError(f"{path}:1: expected a mapping of keys (key: value), got {_kind(data)}.")
    try:
        return model.model_validate(data, context=dict(context or {}))
    except ValidationError as exc:
        problems = sorted((_describe(error, path, lines) for error in exc.errors()),
                          key=lambda problem: problem[0])
        raise ConfigError("\n".join(text for _, text in problems)) from None


def _describe(error: Mapping[str, Any], path: Path,
              lines: Mapping[KeyPath, int]) -> tuple[int, str]:
    loc: KeyPath = ()
    for part in error["loc"]:
        # a tag is dropped, unless it is a key of the file (a destination named "xnat")
        if not _is_union_tag(part) or (*loc, part) in lines:
            loc = (*loc, part)
    line = _nearest_line(loc, lines)
    key = _dotted(loc) or "(top level)"
    message = str(error["msg"])
    if error["type"] == "extra_forbidden":
        message = "unknown key; check its spelling against the example config"
    elif error["type"] == "missing":
        message = "required key is missing"
    elif message.startswith("Value error, "):
        message = message.removeprefix("Value error, ")
    return line, f"{path}:{line}: {key}: {message}"


def _is_union_tag(part: str | int) -> bool:
    # pydantic inserts the tag of a discriminated union ("dicom") and function names into locs
    return isinstance(part, str) and (part in {"dicom", "xnat"} or part.startswith("function-"))


def _nearest_line(loc: Sequence[str | int], lines: Mapping[KeyPath, int]) -> int:
    for end in range(len(loc), -1, -1):
        key = tuple(loc[:end])
        if key in lines:
            return lines[key]
    return 1


def _dotted(loc: Sequence[str | int]) -> str:
    text = ""
    for part in loc:
        text += f"[{part}]" if isinstance(part, int) else (f".{part}" if text else str(part))
    return text


def _kind(value: Any) -> str:
    return {list: "a list", str: "a string", int: "a number", float: "a number"}.get(
        type(value), type(value).__name__
    )
