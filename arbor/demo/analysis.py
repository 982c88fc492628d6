"""Static analysis of Python source files with the standard library ``ast`` module."""

from __future__ import annotations

import ast
import dataclasses
import io
import logging
import os
import tokenize
import warnings
from typing import TypeGuard

logger = logging.getLogger(__name__)

# Directory names that hold installed third-party code or bytecode caches, not project source.
SKIPPED_DIRECTORY_NAMES = frozenset({"site-packages", "dist-packages", "__pycache__"})

# Nodes that each add one decision point to the complexity of the enclosing function.
# ast.match_case is one `case` block of a `match` statement, and ExceptHandler also covers
# the handlers of `except*`.
_SINGLE_DECISION_NODES: tuple[type[ast.AST], ...] = (
    ast.If,
    ast.For,
    ast.AsyncFor,
    ast.While,
    ast.IfExp,
    ast.ExceptHandler,
    ast.match_case,
    ast.Assert,
)

# Errors that mark a file as unreadable or unparseable. The parser raises MemoryError with an
# empty message when its stack overflows on deeply nested expressions (for example 100,000
# unary minus signs on CPython 3.11), so that is a property of the file too.
_FILE_ERRORS: tuple[type[BaseException], ...] = (
    OSError,
    SyntaxError,
    ValueError,
    UnicodeDecodeError,
    RecursionError,
    MemoryError,
)

# Integer keys of an analyze_file result, summed by summarize.
_RESULT_COUNT_KEYS = ("lines", "functions", "classes", "imports")

# Integer keys of a summary, added by merge_summaries.
_SUMMARY_COUNT_KEYS = ("files", *_RESULT_COUNT_KEYS)

# One item of the explicit stack that _measure_tree walks the tree with.
_PendingNode = tuple[ast.AST, str, int | None, set[str]]

# One top_functions entry while it is ranked: (path, qualname, complexity, lineno).
_RankedFunction = tuple[str, str, int, int]


def list_python_files(root: str) -> list[str]:
    """List every ``*.py`` file under a directory tree.

    Directories named ``site-packages``, ``dist-packages`` or ``__pycache__`` and hidden
    directories (name starting with ".") are skipped, and symbolic links to directories are
    not followed. Only regular files are listed, including symbolic links to regular files.
    A subdirectory that cannot be read is logged and skipped.

    Args:
        root: Directory to search.

    Returns:
        Paths relative to ``root`` with "/" separators, sorted.

    Raises:
        FileNotFoundError: If ``root`` is not a directory.

    Example:
        >>> list_python_files("src")  # doctest: +SKIP
        ['pkg/__init__.py', 'pkg/core.py', 'setup.py']
    """
    if not os.path.isdir(root):
        raise FileNotFoundError(f"Source root not found or not a directory: {root!r}")

    found: list[str] = []
    pending: list[tuple[str, str]] = [(root, "")]
    while pending:
        directory, prefix = pending.pop()
        try:
            with os.scandir(directory) as entries:
                for entry in entries:
                    relpath = prefix + entry.name
                    if entry.is_dir(follow_symlinks=False):
                        if _is_skipped_directory(entry.name):
                            continue
                        pending.append((entry.path, relpath + "/"))
                    elif entry.name.endswith(".py") and entry.is_file():
                        found.append(relpath)
        except OSError as error:
            if directory == root:
                raise
            logger.warning("Skipping unreadable directory %s: %s", directory, error)

    return sorted(found)


def analyze_file(root: str, relpath: str) -> dict[str, object]:
    """Count definitions and imports in one Python file and score each function's complexity.

    The file is parsed from bytes, so a PEP 263 encoding declaration such as
    ``# -*- coding: latin-1 -*-`` is honoured. A file that cannot be read or parsed does not
    raise: its result has zero counts, no complexities and an ``error`` string.

    Args:
        root: Directory that ``relpath`` is relative to.
        relpath: Path of the file relative to ``root``, with "/" separators.

    Returns:
        A JSON-serialisable dict with keys ``path`` (``relpath``), ``lines``, ``functions``
        (``def`` and ``async def``, nested ones and methods included), ``classes``,
        ``imports`` (one per ``import`` or ``from ... import`` statement), ``complexities``
        and ``error``. ``complexities`` contains one ``[qualname, complexity, lineno]`` entry per
        function in source order. ``error`` is None, or ``"<ExceptionType>: <message>"`` on
        one line (only the type name when the exception has no message).

    Example:
        >>> analyze_file("src", "pkg/core.py")["complexities"]  # doctest: +SKIP
        [['Parser.parse', 4, 12], ['Parser.parse.<locals>.step', 2, 15]]
    """
    try:
        with open(os.path.join(root, relpath), "rb") as source_file:
            data = source_file.read()
        measures = _measure_tree(_parse_quietly(data, relpath))
        return {
            "path": relpath,
            "lines": _count_lines(data),
            "functions": measures.functions,
            "classes": measures.classes,
            "imports": measures.imports,
            "complexities": measures.complexities,
            "error": None,
        }
    except _FILE_ERRORS as error:
        return {
            "path": relpath,
            "lines": 0,
            "functions": 0,
            "classes": 0,
            "imports": 0,
            "complexities": [],
            "error": _describe_error(error),
        }


def empty_summary() -> dict[str, object]:
    """Return a summary of no files, the identity element of ``merge_summaries``."""
    return {
        "files": 0,
        "lines": 0,
        "functions": 0,
        "classes": 0,
        "imports": 0,
        "top_functions": [],
        "failed": [],
    }


def summarize(results: list[dict[str, object]], top: int = 10) -> dict[str, object]:
    """Fold ``analyze_file`` results into one summary.

    Args:
        results: Results of ``analyze_file``, one per file.
        top: Number of most complex functions to keep.

    Returns:
        A dict with the summed counts ``files`` (failed files included), ``lines``,
        ``functions``, ``classes`` and ``imports``. ``failed`` contains a sorted
        ``[path, error]`` entry per failed file. ``top_functions`` contains the ``top`` most
        complex functions as ``[path, qualname, complexity, lineno]``, ordered by complexity
        descending, then path, lineno and qualname ascending.

    Raises:
        ValueError: If ``top`` is negative or a result is missing a key.
        TypeError: If a result value has the wrong type.

    Example:
        >>> paths = list_python_files("src")  # doctest: +SKIP
        >>> summarize([analyze_file("src", path) for path in paths])  # doctest: +SKIP
    """
    _check_top(top)
    summary = empty_summary()
    summary["files"] = len(results)
    for key in _RESULT_COUNT_KEYS:
        summary[key] = sum(_get_int(result, key) for result in results)

    failed: list[list[str]] = []
    functions: list[_RankedFunction] = []
    for result in results:
        path = _get_str(result, "path")
        error = _get_value(result, "error")
        if error is not None:
            if not isinstance(error, str):
                raise TypeError(f"Result for {path!r} has a non-string error: {error!r}")
            failed.append([path, error])
        for entry in _get_list(result, "complexities"):
            functions.append(_parse_complexity(path, entry))

    summary["failed"] = sorted(failed)
    summary["top_functions"] = _rank_functions(functions, top)
    return summary


def merge_summaries(a: dict[str, object], b: dict[str, object], top: int = 10) -> dict[str, object]:
    """Combine two summaries into the summary of both sets of files.

    The merge is associative and commutative, and ``empty_summary()`` is its identity.
    Merging the summaries of any split of the results, in any order, therefore gives the same
    dict as ``summarize`` over all of them, provided every summary used the same ``top``.
    Neither input is changed, and the result shares no mutable value with them.

    Args:
        a: A summary from ``summarize``, ``empty_summary`` or an earlier merge.
        b: Another such summary.
        top: Number of most complex functions to keep.

    Returns:
        A new summary with counts added, ``failed`` merged and sorted, and ``top_functions``
        re-ranked and cut to ``top`` entries.

    Raises:
        ValueError: If ``top`` is negative or a summary is missing a key.
        TypeError: If a summary value has the wrong type.
    """
    _check_top(top)
    merged = empty_summary()
    for key in _SUMMARY_COUNT_KEYS:
        merged[key] = _get_int(a, key) + _get_int(b, key)

    failed = [_parse_failed(entry) for entry in _get_list(a, "failed") + _get_list(b, "failed")]
    functions = [
        _parse_top_function(entry)
        for entry in _get_list(a, "top_functions") + _get_list(b, "top_functions")
    ]
    merged["failed"] = sorted(failed)
    merged["top_functions"] = _rank_functions(functions, top)
    return merged


def _is_skipped_directory(name: str) -> bool:
    return name.startswith(".") or name in SKIPPED_DIRECTORY_NAMES


def _parse_quietly(data: bytes, filename: str) -> ast.Module:
    # The parser warns about the analysed code (for example invalid escape sequences), which
    # is not the caller's problem, and a warning filter set to "error" would turn the warning
    # into a SyntaxError. NOTE: catch_warnings changes process-wide state, so parsing from
    # several threads at once can briefly lose other threads' warnings.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return ast.parse(data, filename=filename)


def _count_lines(data: bytes) -> int:
    """Count lines the way the tokenizer numbers them.

    Only "\\n", "\\r\\n" and "\\r" end a line, as in the ``lineno`` of AST nodes, so form
    feeds and Unicode line separators inside the text do not add lines.
    """
    try:
        encoding, _ = tokenize.detect_encoding(io.BytesIO(data).readline)
    except SyntaxError:
        encoding = "utf-8"
    text = data.decode(encoding, errors="replace")
    text = text.replace("\r\n", "\n").replace("\r", "\n")
    if not text:
        return 0
    return text.count("\n") + (0 if text.endswith("\n") else 1)


@dataclasses.dataclass
class _TreeMeasures:
    """Counts and per-function complexities of one parsed module."""

    functions: int = 0
    classes: int = 0
    imports: int = 0
    complexities: list[list[object]] = dataclasses.field(default_factory=list)


def _measure_tree(tree: ast.Module) -> _TreeMeasures:
    """Count definitions and imports and score every function, in one pass over the tree.

    Each function's complexity is 1 plus the decision points in its own body, and entries
    are ``[qualname, complexity, lineno]`` in source order. The body of a nested function or
    class is not part of the enclosing function, but the nested definition's decorators,
    default values, annotations and base classes are, because the enclosing function
    evaluates them. Decision points in module-level code and class bodies count for no
    function. The walk uses an explicit stack, so deeply nested code cannot exhaust the
    interpreter's recursion limit.
    """
    measures = _TreeMeasures()
    functions: list[tuple[str, int]] = []
    complexities: list[int] = []
    # Each item is a node, the qualname prefix of its scope and the index of the function
    # whose complexity it adds to (None outside any function). The last element is the set of
    # names that the scope declares `global`, filled in as the walk meets `global` statements.
    pending: list[_PendingNode] = [
        (statement, "", None, set()) for statement in reversed(tree.body)
    ]
    while pending:
        node, prefix, owner, scope_globals = pending.pop()
        children: list[_PendingNode] = []

        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            # Python gives a definition bound to a `global` name a top-level qualname. A
            # scope's `global` statement always comes before such a definition in the
            # source, because the compiler rejects a binding before the declaration.
            qualname = node.name if node.name in scope_globals else prefix + node.name
            body_prefix: str
            body_owner: int | None
            if isinstance(node, ast.ClassDef):
                measures.classes += 1
                body_prefix, body_owner = qualname + ".", None
            else:
                measures.functions += 1
                body_prefix, body_owner = qualname + ".<locals>.", len(functions)
                functions.append((qualname, node.lineno))
                complexities.append(1)
            body_globals: set[str] = set()
            for field, value in ast.iter_fields(node):
                if field == "body":
                    children.extend(
                        (child, body_prefix, body_owner, body_globals) for child in value
                    )
                else:
                    children.extend(
                        (child, prefix, owner, scope_globals) for child in _field_nodes(value)
                    )
        else:
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                measures.imports += 1
            elif isinstance(node, ast.Global):
                scope_globals.update(node.names)
            if owner is not None:
                complexities[owner] += _decision_points(node)
            children.extend(
                (child, prefix, owner, scope_globals) for child in ast.iter_child_nodes(node)
            )

        pending.extend(reversed(children))

    measures.complexities = [
        [qualname, complexity, lineno]
        for (qualname, lineno), complexity in zip(functions, complexities, strict=True)
    ]
    return measures


def _field_nodes(value: object) -> list[ast.AST]:
    if isinstance(value, ast.AST):
        return [value]
    if isinstance(value, list):
        return [item for item in value if isinstance(item, ast.AST)]
    return []


def _decision_points(node: ast.AST) -> int:
    if isinstance(node, _SINGLE_DECISION_NODES):
        return 1
    if isinstance(node, ast.BoolOp):
        # `a and b and c` is one BoolOp with three values and two short-circuit branches.
        return len(node.values) - 1
    if isinstance(node, ast.comprehension):
        return len(node.ifs)
    return 0


def _describe_error(error: BaseException) -> str:
    message = " ".join(line.strip() for line in str(error).splitlines() if line.strip())
    name = type(error).__name__
    return f"{name}: {message}" if message else name


def _check_top(top: int) -> None:
    if top < 0:
        raise ValueError(f"top must be zero or a positive number of functions, got {top}")


def _rank_functions(functions: list[_RankedFunction], top: int) -> list[list[object]]:
    # The key orders every distinct entry, so the ranking never depends on input order.
    ranked = sorted(functions, key=lambda item: (-item[2], item[0], item[3], item[1]))
    return [list(item) for item in ranked[:top]]


def _parse_complexity(path: str, entry: object) -> _RankedFunction:
    if not (isinstance(entry, list) and len(entry) == 3):
        raise TypeError(
            f"Result for {path!r} has a complexity entry that is not "
            f"[qualname, complexity, lineno]: {entry!r}"
        )
    qualname, complexity, lineno = entry
    if not (isinstance(qualname, str) and _is_int(complexity) and _is_int(lineno)):
        raise TypeError(f"Result for {path!r} has an invalid complexity entry: {entry!r}")
    return (path, qualname, complexity, lineno)


def _parse_top_function(entry: object) -> _RankedFunction:
    if isinstance(entry, list) and len(entry) == 4:
        path, qualname, complexity, lineno = entry
        if (
            isinstance(path, str)
            and isinstance(qualname, str)
            and _is_int(complexity)
            and _is_int(lineno)
        ):
            return (path, qualname, complexity, lineno)
    raise TypeError(f"A top_functions entry is not [path, qualname, complexity, lineno]: {entry!r}")


def _parse_failed(entry: object) -> list[str]:
    if isinstance(entry, list) and len(entry) == 2:
        path, error = entry
        if isinstance(path, str) and isinstance(error, str):
            return [path, error]
    raise TypeError(f"A failed entry is not [path, error]: {entry!r}")


def _is_int(value: object) -> TypeGuard[int]:
    return isinstance(value, int) and not isinstance(value, bool)


def _get_int(record: dict[str, object], key: str) -> int:
    value = _get_value(record, key)
    if not _is_int(value):
        raise TypeError(f"Value of {key!r} must be an integer, got {value!r}")
    return value


def _get_str(record: dict[str, object], key: str) -> str:
    value = _get_value(record, key)
    if not isinstance(value, str):
        raise TypeError(f"Value of {key!r} must be a string, got {value!r}")
    return value


def _get_list(record: dict[str, object], key: str) -> list[object]:
    value = _get_value(record, key)
    if not isinstance(value, list):
        raise TypeError(f"Value of {key!r} must be a list, got {value!r}")
    return value


def _get_value(record: dict[str, object], key: str) -> object:
    if key not in record:
        raise ValueError(f"Missing key {key!r}, the record has keys {sorted(record)!r}")
    return record[key]
