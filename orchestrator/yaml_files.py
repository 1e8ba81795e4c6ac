"""Reading the YAML files users write (experiments, sweeps): a mapping, or one line naming the file and
what is wrong with it, whatever bytes it holds."""
from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from detectors.errors import UserInputError

MAX_YAML_BYTES = 1 << 20  # an experiment or sweep is a few dozen lines


class StrictLoader(yaml.SafeLoader):
    """Safe YAML without its surprises: a key given twice is an error (not the later value), and
    aliases are refused (``*name`` repeats a node, and nested repeats expand without bound)."""

    def compose_node(self, parent, index):
        if self.check_event(yaml.AliasEvent):
            raise yaml.composer.ComposerError(None, None, "aliases (*name) are not allowed here",
                                              self.peek_event().start_mark)
        return super().compose_node(parent, index)

    def construct_mapping(self, node, deep=False):
        seen = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=True)
            try:
                twice = key in seen
                seen.add(key)
            except TypeError:  # a list or mapping as a key
                raise yaml.constructor.ConstructorError(None, None, "a key must be a plain value",
                                                        key_node.start_mark) from None
            if twice:
                raise yaml.constructor.ConstructorError(None, None, f"the key {key!r} is given twice",
                                                        key_node.start_mark)
        return super().construct_mapping(node, deep)


def read_yaml_mapping(path: str | Path, what: str) -> dict[str, Any]:
    """The mapping a YAML file holds, or one line naming the file and what is wrong with it,
    whatever bytes it holds."""
    path = Path(path)
    try:
        if path.is_dir():
            raise UserInputError(f"{what} {path} is a directory, not a file")
        if not path.exists():
            raise UserInputError(f"{what} not found: {path}")
        if path.stat().st_size > MAX_YAML_BYTES:
            raise UserInputError(f"{path}: {path.stat().st_size} bytes is too large for an {what} "
                                 f"(at most {MAX_YAML_BYTES} bytes)")
        data = path.read_bytes()
    except OSError as exc:
        raise UserInputError(f"{what} {path} cannot be read: {exc.strerror or exc}") from None
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise UserInputError(f"{path}: not UTF-8 text (byte 0x{data[exc.start]:02x} at offset {exc.start})") from None
    try:
        raw = yaml.load(text, Loader=StrictLoader) or {}
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = " ".join(str(getattr(exc, "problem", None) or "invalid YAML").split())
        raise UserInputError(f"{path}: not valid YAML{where}: {problem}") from None
    except RecursionError:
        raise UserInputError(f"{path}: not valid YAML: nested too deeply") from None
    if not isinstance(raw, dict):
        raise UserInputError(f"{path}: expected a mapping of sections, got a {type(raw).__name__}")
    return raw
