"""Limits on what a state file may ask the YAML loader to do: size, nesting depth and alias
expansion (guards against hostile or broken input, e.g. a "billion laughs" alias bomb).

Sits inside loading, between reading and validating: `load.py` reads the text, this module
composes it and checks the limits *before* anything is expanded, then `load.py` constructs
the document and pydantic validates it (load -> guard -> pydantic). A state file that
validates must also be one that mailrec can hold in memory and apply.

Errors are `LimitExceeded` with a 1-based line and column (0 when there is no place);
`load.py` turns them into its `Problem`s, which also name the file.
"""

from __future__ import annotations

from typing import Any

from ruamel.yaml import YAML
from ruamel.yaml.composer import MaxDepthExceededError
from ruamel.yaml.nodes import MappingNode, Node, SequenceNode

MAX_FILE_BYTES = 32 * 1024 * 1024  # per file
MAX_DEPTH = 64  # nesting of mappings and sequences, aliases expanded (a real state needs 4)
MAX_ALIAS_NODES = 1_000_000  # nodes that aliases add when expanded (a "billion laughs" bomb)

TOO_DEEP = f"YAML nesting deeper than {MAX_DEPTH} levels"


class LimitExceeded(ValueError):
    """The text asks for more than a state file may: `line`, `column` are 1-based (0: no
    place to name)."""

    def __init__(self, line: int, column: int, message: str) -> None:
        self.line = line
        self.column = column
        self.message = message
        super().__init__(message)


def too_large(size: int) -> str:
    """The message for a file of `size` bytes above MAX_FILE_BYTES."""
    return (f"the file is {size / 1024 / 1024:.1f} MiB: a state file may be at most "
            f"{MAX_FILE_BYTES // 1024 // 1024} MiB")


def limit_depth(yaml: YAML) -> YAML:
    """Make the composer stop at MAX_DEPTH before recursing deeper (ruamel >= 0.18.7; older
    versions ignore it, and `check_graph` still holds the limit)."""
    yaml.max_depth = MAX_DEPTH
    return yaml


def _at(mark: Any, message: str) -> LimitExceeded:
    line = mark.line + 1 if mark is not None else 0
    col = mark.column + 1 if mark is not None else 0
    return LimitExceeded(line, col, message)


def compose(yaml: YAML, text: str) -> Node | None:
    """`yaml.compose(text)`, with every limit checked: the size and the flow nesting of the
    text before composing, the depth while composing, the expansion of aliases after. The
    node returned is safe to construct. YAML syntax errors pass through unchanged."""
    if len(text) > MAX_FILE_BYTES:
        raise LimitExceeded(0, 0, too_large(len(text)))
    deep = flow_depth_mark(text)
    if deep is not None:
        raise LimitExceeded(deep[0] + 1, deep[1] + 1, TOO_DEEP)
    try:
        node: Node | None = yaml.compose(text)
    except MaxDepthExceededError as exc:
        raise _at(exc.problem_mark, TOO_DEEP) from None
    except RecursionError:  # an old ruamel without max_depth: no place to name
        raise LimitExceeded(0, 0, TOO_DEEP) from None
    check_graph(node)
    return node


def check_graph(root: Node | None) -> None:
    """Reject a composed document whose expansion would be too deep or too large, before it
    is expanded: the composer shares one node per anchor (an alias is the same object), so a
    walk with sizes memoised per anchored node is linear in the file, not in the expansion."""
    if root is None:
        return
    done: dict[int, tuple[int, int]] = {}  # id(anchored node) -> (expanded size, height)
    open_anchors: set[int] = set()
    added = 0  # nodes the aliases add to the expansion so far
    # Frames: [node, children, next index, size so far, height so far, depth, use mark].
    stack: list[list[Any]] = []

    def enter(node: Node, depth: int, use: Any) -> tuple[int, int] | None:
        """Push node, or return (size, height) at once for a scalar or an alias."""
        nonlocal added
        key = id(node)
        if key in open_anchors:
            raise _at(use, f"YAML alias *{node.anchor} refers to the collection it is in "
                           f"(&{node.anchor} at line {node.start_mark.line + 1}): a "
                           "recursive structure cannot be a state")
        if key in done:
            size, height = done[key]
            added += size
            if added > MAX_ALIAS_NODES:
                raise _at(use, f"YAML aliases expand to more than {MAX_ALIAS_NODES:,} nodes "
                               f"(here *{node.anchor}, anchored &{node.anchor} at line "
                               f"{node.start_mark.line + 1}, is {size:,} nodes): refusing "
                               "to expand (a 'billion laughs' alias bomb?)")
            if depth + height - 1 > MAX_DEPTH:
                raise _at(use, f"YAML nesting deeper than {MAX_DEPTH} levels once alias "
                               f"*{node.anchor} is expanded")
            return size, height
        if depth > MAX_DEPTH:
            raise _at(node.start_mark, TOO_DEEP)
        if isinstance(node, MappingNode):
            children = [n for pair in node.value for n in pair]
        elif isinstance(node, SequenceNode):
            children = list(node.value)
        else:
            if node.anchor is not None:
                done[key] = (1, 1)
            return 1, 1
        if node.anchor is not None:
            open_anchors.add(key)
        stack.append([node, children, 0, 1, 1, depth, use])
        return None

    result = enter(root, 1, root.start_mark)
    while stack:
        frame = stack[-1]
        node, children, index = frame[0], frame[1], frame[2]
        if index < len(children):
            frame[2] = index + 1
            child = children[index]
            # Where an alias is used: its key's line in a mapping, else the collection's.
            use = (children[index - 1].start_mark
                   if isinstance(node, MappingNode) and index % 2 else node.start_mark)
            result = enter(child, frame[5] + 1, use)
            if result is not None:
                frame[3] += result[0]
                frame[4] = max(frame[4], result[1] + 1)
            continue
        stack.pop()
        size, height = frame[3], frame[4]
        if node.anchor is not None:
            open_anchors.discard(id(node))
            done[id(node)] = (size, height)
        if stack:
            stack[-1][3] += size
            stack[-1][4] = max(stack[-1][4], height + 1)


def flow_depth_mark(text: str) -> tuple[int, int] | None:
    """(line, column), 0-based, of the first flow collection (`[`, `{`) nested deeper than
    MAX_DEPTH, or None. ruamel's scanner is quadratic in the number of flow collections open
    on one line (about 5 s for 1,000 `[`), so that case is found here first, by a small
    lexer that knows quotes, comments and block scalars; the composer checks every other
    kind of nesting itself."""
    if not any(line.count("[") + line.count("{") > MAX_DEPTH for line in text.splitlines()):
        return None  # the common case: nothing to look at
    size = len(text)
    depth = line = column = index = line_indent = 0
    node_may_start = True  # after "key:", "- ", "[", "{", "," or at a line start

    def indent_at(start: int) -> int:
        end = start
        while end < size and text[end] == " ":
            end += 1
        return end - start

    while index < size:
        char = text[index]
        ahead = text[index + 1] if index + 1 < size else "\n"
        step = 1
        if char == "\n":
            line, column, index = line + 1, 0, index + 1
            node_may_start = True
            line_indent = indent_at(index)
            continue
        if char in " \t":
            pass
        elif char == "#" and (column == 0 or text[index - 1] in " \t"):
            end = text.find("\n", index)
            step = (size if end < 0 else end) - index
        elif node_may_start and char in "[{":
            depth += 1
            if depth > MAX_DEPTH:
                return line, column
        elif node_may_start and char in "\"'":
            end = index + 1
            while end < size:
                if char == '"' and text[end] == "\\":
                    end += 2
                    continue
                if text[end] == char:
                    if char == "'" and text[end + 1:end + 2] == "'":
                        end += 2
                        continue
                    break
                end += 1
            quoted = text[index:end + 1]
            newlines = quoted.count("\n")
            if newlines:
                line += newlines
                column = len(quoted) - quoted.rfind("\n") - 1
            else:
                column += len(quoted)
            index = end + 1
            node_may_start = False
            continue
        elif node_may_start and char in "|>" and depth == 0:
            # A block scalar: skip its lines (blank, or indented more than this line's key).
            end = text.find("\n", index)
            while end >= 0:
                following = text.find("\n", end + 1)
                body = text[end + 1:following if following >= 0 else size]
                if body.strip() and indent_at(end + 1) <= line_indent:
                    break
                line += 1
                end = following
            index, column = (size if end < 0 else end), 0
            continue
        elif char in "]}" and depth:
            depth -= 1
            node_may_start = False
        else:
            # A node may start after "," in a flow collection, "- ", "? ", ": " (or ":" in a
            # flow collection); anything else is inside a plain scalar.
            node_may_start = bool(
                (char == "," and depth)
                or (char in "-?:" and (ahead in " \t\n" or (depth and char == ":")))
            )
        index, column = index + step, column + step
    return None
