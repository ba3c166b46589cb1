"""Loading YAML into pydantic models, with errors that name the file, the line and the path."""

from __future__ import annotations

from pathlib import Path
from typing import NamedTuple, TypeVar

import yaml
from pydantic import BaseModel, ValidationError

from lethe.kernel.errors import LetheError

M = TypeVar("M", bound=BaseModel)


TOP_LEVEL = "(top level)"
"""The path of a problem of the whole file."""


class FileProblem(NamedTuple):
    """One problem of a YAML file: the line (None when it has none), the path inside the file
    (None when the file cannot be read or parsed), and what is wrong."""

    line: int | None
    path: str | None
    problem: str


class InvalidFile(LetheError):
    """A YAML file cannot be read, or does not describe a valid model; `problems` holds each
    problem, and the message says them one a line as `file:line: path: problem`."""

    def __init__(self, file: Path, problems: list[FileProblem]) -> None:
        self.file, self.problems = file, problems
        super().__init__("\n".join(_said(file, problem) for problem in problems))


class UnreadableFile(InvalidFile):
    """A YAML file cannot be read at all (missing, not allowed, not UTF-8 text)."""


def _said(file: Path, problem: FileProblem) -> str:
    line = f":{problem.line}" if problem.line is not None else ""
    path = f"{problem.path}: " if problem.path is not None else ""
    return f"{file}{line}: {path}{problem.problem}"


def dotted(loc: tuple[int | str, ...]) -> str:
    """A path inside a file as text: `systems[0].tables[2]`."""
    text = ""
    for part in loc:
        text += f"[{part}]" if isinstance(part, int) else (f".{part}" if text else str(part))
    return text or TOP_LEVEL


def locate(node: yaml.Node, loc: tuple[int | str, ...]) -> tuple[tuple[int | str, ...], int]:
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
    except (OSError, UnicodeDecodeError) as exc:
        why = exc.strerror if isinstance(exc, OSError) else "not UTF-8 text"
        raise UnreadableFile(path, [FileProblem(None, None, f"cannot be read ({why})")]) from None
    try:
        tree = yaml.compose(text, Loader=yaml.SafeLoader) or yaml.MappingNode("", [])
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        line = mark.line + 1 if mark is not None else None
        problem = f"not valid YAML ({getattr(exc, 'problem', exc)})"
        raise InvalidFile(path, [FileProblem(line, None, problem)]) from None
    try:
        return model.model_validate(data if data is not None else {})
    except ValidationError as exc:
        problems = []
        for error in exc.errors(include_url=False):
            loc, line = locate(tree, tuple(error["loc"]))
            message = error["msg"].removeprefix("Value error, ")
            problems.append(FileProblem(line, dotted(loc), message))
        raise InvalidFile(path, problems) from None
