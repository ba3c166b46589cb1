"""Loading YAML into pydantic models, with errors that name the file, the line and the path."""

from __future__ import annotations

from pathlib import Path
from typing import TypeVar

import yaml
from pydantic import BaseModel, ValidationError

from lethe.kernel.errors import LetheError

M = TypeVar("M", bound=BaseModel)


class InvalidFile(LetheError):
    """A YAML file cannot be read, or does not describe a valid model."""


def _dotted(loc: tuple[int | str, ...]) -> str:
    text = ""
    for part in loc:
        text += f"[{part}]" if isinstance(part, int) else (f".{part}" if text else str(part))
    return text or "(top level)"


def _locate(node: yaml.Node, loc: tuple[int | str, ...]) -> tuple[tuple[int | str, ...], int]:
    """The path as the file spells it and the 1-based line of the deepest node found along it.

    pydantic puts the chosen member of a tagged union (e.g. `sql`) into the location; the file
    has it as a value (`kind: sql`), not a key, so such parts are dropped.
    """
    path: list[int | str] = []
    line = node.start_mark.line + 1
    for index, part in enumerate(loc):
        child: yaml.Node | None = None
        if isinstance(node, yaml.MappingNode):
            spelled_as_value = any(
                isinstance(v, yaml.ScalarNode) and v.value == part for _, v in node.value
            )
            # `kind: logs` with a `logs:` list: the member comes first, then the same key.
            repeated = index + 1 < len(loc) and loc[index + 1] == part
            child = next((v for k, v in node.value if k.value == part), None)
            if spelled_as_value and (child is None or repeated):
                continue
        elif isinstance(node, yaml.SequenceNode) and isinstance(part, int):
            child = node.value[part] if part < len(node.value) else None
        path.append(part)
        if child is not None:
            node, line = child, child.start_mark.line + 1
    return tuple(path), line


def load_model(path: str | Path, model: type[M]) -> M:
    """Parse a YAML file into `model`; every problem is reported as `file:line: path: message`."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise InvalidFile(f"{path}: cannot be read ({exc.strerror})") from None
    try:
        tree = yaml.compose(text, Loader=yaml.SafeLoader) or yaml.MappingNode("", [])
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"{path}:{mark.line + 1}" if mark is not None else str(path)
        raise InvalidFile(f"{where}: not valid YAML ({getattr(exc, 'problem', exc)})") from None
    try:
        return model.model_validate(data if data is not None else {})
    except ValidationError as exc:
        problems = []
        for error in exc.errors(include_url=False):
            loc, line = _locate(tree, tuple(error["loc"]))
            message = error["msg"].removeprefix("Value error, ")
            problems.append(f"{path}:{line}: {_dotted(loc)}: {message}")
        raise InvalidFile("\n".join(problems)) from None
