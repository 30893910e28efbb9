"""Load a YAML file and validate it with pydantic, so every error names file, line and key."""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, BinaryIO, TypeVar

import yaml
from pydantic import BaseModel, ValidationError

Model = TypeVar("Model", bound=BaseModel)
KeyPath = tuple[str | int, ...]
#: values (scalars, lists, mappings) a file may expand to through its aliases
MAX_NODES = 100_000
#: levels of nesting (a config is a few levels deep; an alias inside itself is endless)
MAX_DEPTH = 64


class ConfigError(Exception):
    """A config or route file is unusable; the message says where and what is expected."""


def load_yaml(path: Path, content: bytes | None = None, *, max_bytes: int,
              allow_aliases: bool) -> tuple[Any, dict[KeyPath, int]]:
    """Parse `path` (its `content` when already read); return the data and the line number of
    every key in it. Files past `max_bytes` are refused unread; without `allow_aliases`,
    anchors, aliases and merge keys are refused (a file inbox users write: billion laughs)."""
    if content is None:
        try:
            with open(path, "rb") as stream:
                content = read_limited(stream, path, max_bytes)
        except OSError as exc:
            raise ConfigError(f"{path}: cannot read the file ({exc.strerror}).") from None
    elif len(content) > max_bytes:
        raise ConfigError(too_big(path, len(content), max_bytes))
    try:
        text = content.decode("utf-8")
    except UnicodeDecodeError:
        raise ConfigError(f"{path}: not UTF-8 text; save it as UTF-8 YAML.") from None
    node, data = _parse(text, path, PlainLoader if not allow_aliases else yaml.SafeLoader)
    lines: dict[KeyPath, int] = {}
    if node is not None:
        _record_lines(node, lines, path)
    return data, lines


def read_limited(stream: BinaryIO, path: Path, max_bytes: int) -> bytes:
    """The whole of an open file of at most `max_bytes`; ConfigError (naming its size) for a
    longer one, of which no more than max_bytes + 1 bytes are read."""
    content = stream.read(max_bytes + 1)
    if len(content) > max_bytes:
        try:
            size = os.fstat(stream.fileno()).st_size
        except (OSError, ValueError):
            size = len(content)
        raise ConfigError(too_big(path, max(size, len(content)), max_bytes))
    return content


def too_big(path: Path, size: int, max_bytes: int) -> str:
    return (f"{path}: {size} bytes, more than the {max_bytes} bytes this file may have; "
            "it should hold a few lines of YAML: check it is the right file")


class PlainLoader(yaml.SafeLoader):
    """SafeLoader without anchors, aliases (`&name`, `*name`) or merge keys (`<<`): a route
    file is a handful of keys, and an alias of an alias of ... is the billion-laughs bomb."""

    def compose_node(self, parent: yaml.Node | None, index: Any) -> yaml.Node | None:
        event = self.peek_event()
        if isinstance(event, yaml.AliasEvent) or getattr(event, "anchor", None) is not None:
            raise RefusedYAML(
                "anchors and aliases (&name, *name) are not allowed here; write each value "
                "out", event.start_mark)
        return super().compose_node(parent, index)

    def flatten_mapping(self, node: yaml.MappingNode) -> None:
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":
                raise RefusedYAML("merge keys (<<) are not allowed here; write each key out",
                                  key_node.start_mark)
        super().flatten_mapping(node)


class RefusedYAML(yaml.MarkedYAMLError):
    """Valid YAML that this file may not use."""

    def __init__(self, problem: str, mark: yaml.Mark) -> None:
        super().__init__(problem=problem, problem_mark=mark)


def _parse(text: str, path: Path, loader_class: type[yaml.SafeLoader]) -> tuple[Any, Any]:
    """The document's node tree and its data, built from that one tree."""
    loader = loader_class(text)
    try:
        node = loader.get_single_node()
        return node, (loader.construct_document(node) if node is not None else None)
    except RefusedYAML as exc:
        raise ConfigError(f"{_where(path, exc)}: {exc.problem}.") from None
    except yaml.MarkedYAMLError as exc:
        raise ConfigError(f"{_where(path, exc)}: invalid YAML: "
                          f"{exc.problem or exc.context}.") from None
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: invalid YAML: {exc}.") from None
    except RecursionError:
        raise ConfigError(f"{path}: nested too deeply to read; flatten it") from None
    except ValueError as exc:  # e.g. an integer of more digits than Python converts
        raise ConfigError(f"{path}: a value can't be read ({exc}).") from None
    finally:
        loader.dispose()


def _where(path: Path, exc: yaml.MarkedYAMLError) -> str:
    mark = exc.problem_mark or exc.context_mark
    return f"{path}:{mark.line + 1}" if mark else str(path)


def _record_lines(root: yaml.Node, lines: dict[KeyPath, int], path: Path) -> None:
    """Every key's line; walked without recursion, and at most MAX_NODES nodes MAX_DEPTH
    deep, since a site config's aliases may make a small file expand to a huge (or endless)
    tree."""
    pending: list[tuple[yaml.Node, KeyPath]] = [(root, ())]
    visited = 0
    while pending:
        node, prefix = pending.pop()
        visited += 1
        if visited > MAX_NODES or len(prefix) > MAX_DEPTH:
            raise ConfigError(f"{path}: nests more than {MAX_DEPTH} levels deep or expands "
                              f"to more than {MAX_NODES} values (aliases, *name, that repeat "
                              "or contain themselves); flatten it or use fewer aliases")
        lines.setdefault(prefix, node.start_mark.line + 1)
        if isinstance(node, yaml.MappingNode):
            for key_node, value_node in node.value:
                key = (*prefix, str(key_node.value))
                lines[key] = key_node.start_mark.line + 1
                pending.append((value_node, key))
        elif isinstance(node, yaml.SequenceNode):
            pending.extend((item, (*prefix, index)) for index, item in enumerate(node.value))


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
