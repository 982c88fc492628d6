"""Tests for the static analysis behind the arbor demo workload."""

from __future__ import annotations

import copy
import functools
import inspect
import json
import os
import random
import sys
import textwrap
import warnings
from pathlib import Path

import pytest

from arbor.demo.analysis import (
    analyze_file,
    empty_summary,
    list_python_files,
    merge_summaries,
    summarize,
)


def write_file(root: Path, relpath: str, content: str | bytes) -> Path:
    path = root / relpath
    path.parent.mkdir(parents=True, exist_ok=True)
    if isinstance(content, bytes):
        path.write_bytes(content)
    else:
        path.write_bytes(textwrap.dedent(content).encode("utf-8"))
    return path


def analyze_source(tmp_path: Path, source: str | bytes) -> dict[str, object]:
    write_file(tmp_path, "module.py", source)
    return analyze_file(str(tmp_path), "module.py")


def complexity_of(result: dict[str, object], qualname: str) -> int:
    complexities = result["complexities"]
    assert isinstance(complexities, list)
    matches = [entry[1] for entry in complexities if entry[0] == qualname]
    assert len(matches) == 1, f"{qualname!r} not found once in {complexities!r}"
    return int(matches[0])


def failed_result(path: str, error: str) -> dict[str, object]:
    return {
        "path": path,
        "lines": 0,
        "functions": 0,
        "classes": 0,
        "imports": 0,
        "complexities": [],
        "error": error,
    }


def fake_result(path: str, complexities: list[list[object]]) -> dict[str, object]:
    return {
        "path": path,
        "lines": 10,
        "functions": len(complexities),
        "classes": 0,
        "imports": 1,
        "complexities": complexities,
        "error": None,
    }


def merge_all(summaries: list[dict[str, object]], top: int) -> dict[str, object]:
    return functools.reduce(
        lambda left, right: merge_summaries(left, right, top=top), summaries, empty_summary()
    )


# Complexity: one test per decision point kind.


def test_function_without_branches_scores_one(tmp_path: Path) -> None:
    result = analyze_source(tmp_path, "def f(x):\n    return x + 1\n")

    assert result["complexities"] == [["f", 1, 1]]


def test_complexity_counts_if_and_elif(tmp_path: Path) -> None:
    source = """
        def f(x):
            if x > 1:
                return 1
            elif x > 0:
                return 2
            else:
                return 3
    """
    result = analyze_source(tmp_path, source)

    assert complexity_of(result, "f") == 3


def test_complexity_counts_for_and_async_for(tmp_path: Path) -> None:
    source = """
        async def f(items, stream):
            for item in items:
                pass
            else:
                pass
            async for chunk in stream:
                pass
    """
    result = analyze_source(tmp_path, source)

    assert complexity_of(result, "f") == 3


def test_complexity_counts_while_loop(tmp_path: Path) -> None:
    source = """
        def f(n):
            while n:
                n -= 1
            else:
                pass
    """
    result = analyze_source(tmp_path, source)

    assert complexity_of(result, "f") == 2


def test_complexity_counts_conditional_expression(tmp_path: Path) -> None:
    result = analyze_source(tmp_path, "def f(x):\n    return 1 if x else 2\n")

    assert complexity_of(result, "f") == 2


def test_complexity_counts_each_except_handler(tmp_path: Path) -> None:
    source = """
        def f():
            try:
                pass
            except ValueError:
                pass
            except (KeyError, TypeError):
                pass
            else:
                pass
            finally:
                pass
    """
    result = analyze_source(tmp_path, source)

    assert complexity_of(result, "f") == 3


@pytest.mark.skipif(sys.version_info < (3, 11), reason="except* needs Python 3.11")
def test_complexity_counts_except_star_handlers(tmp_path: Path) -> None:
    source = """
        def f():
            try:
                pass
            except* ValueError:
                pass
            except* KeyError:
                pass
    """
    result = analyze_source(tmp_path, source)

    assert complexity_of(result, "f") == 3


def test_complexity_counts_comprehension_if_clauses(tmp_path: Path) -> None:
    source = """
        def f(rows):
            evens = [row for row in rows if row % 2 == 0 if row > 0]
            keys = {row: 1 for row in rows if row}
            plain = {row for row in rows}
            return sum(row for row in rows if row)
    """
    result = analyze_source(tmp_path, source)

    assert complexity_of(result, "f") == 5


def test_complexity_counts_each_match_case(tmp_path: Path) -> None:
    source = """
        def f(command):
            match command:
                case "start":
                    return 1
                case "stop" | "halt":
                    return 2
                case _:
                    return 3
    """
    result = analyze_source(tmp_path, source)

    assert complexity_of(result, "f") == 4


def test_complexity_counts_assert(tmp_path: Path) -> None:
    result = analyze_source(tmp_path, "def f(x):\n    assert x, 'x is required'\n")

    assert complexity_of(result, "f") == 2


def test_complexity_counts_boolean_operators(tmp_path: Path) -> None:
    source = """
        def f(a, b, c, d):
            first = a and b and c
            second = (a and b) or d
    """
    result = analyze_source(tmp_path, source)

    # 1 + (3 - 1) for the first BoolOp + (2 - 1) for the `or` + (2 - 1) for the inner `and`.
    assert complexity_of(result, "f") == 5


def test_complexity_includes_lambda_bodies(tmp_path: Path) -> None:
    source = """
        def f(items):
            return sorted(items, key=lambda item: item.size if item else 0)
    """
    result = analyze_source(tmp_path, source)

    assert result["complexities"] == [["f", 2, 2]]


def test_module_level_branches_score_no_function(tmp_path: Path) -> None:
    source = """
        import sys
        if sys.platform == "linux":
            handler = lambda x: x if x else None
        assert handler
    """
    result = analyze_source(tmp_path, source)

    assert result["complexities"] == []


def test_class_body_branches_score_no_function(tmp_path: Path) -> None:
    source = """
        class Config:
            if True:
                debug = 1
            def method(self):
                return 1
    """
    result = analyze_source(tmp_path, source)

    assert result["complexities"] == [["Config.method", 1, 5]]


# Nested functions, methods and qualified names.


def test_nested_function_body_is_scored_separately(tmp_path: Path) -> None:
    source = """
        def outer(x):
            if x:
                pass
            def inner(y):
                if y:
                    pass
                while y:
                    pass
            return inner
    """
    result = analyze_source(tmp_path, source)

    assert result["complexities"] == [["outer", 2, 2], ["outer.<locals>.inner", 3, 5]]


def test_decorators_and_defaults_score_in_enclosing_function(tmp_path: Path) -> None:
    source = """
        def outer(flag):
            @register(1 if flag else 2)
            def inner(value=3 if flag else 4):
                return value
            return inner
    """
    result = analyze_source(tmp_path, source)

    assert result["complexities"] == [["outer", 3, 2], ["outer.<locals>.inner", 1, 4]]


def test_method_qualnames_follow_class_nesting(tmp_path: Path) -> None:
    source = """
        class Outer:
            def method(self):
                if self:
                    pass
            class Inner:
                async def run(self):
                    pass
    """
    result = analyze_source(tmp_path, source)

    assert result["complexities"] == [["Outer.method", 2, 3], ["Outer.Inner.run", 1, 7]]


def test_class_inside_function_gets_locals_qualname(tmp_path: Path) -> None:
    source = """
        def factory():
            class Product:
                def describe(self):
                    def helper():
                        pass
            return Product
    """
    result = analyze_source(tmp_path, source)

    assert result["complexities"] == [
        ["factory", 1, 2],
        ["factory.<locals>.Product.describe", 1, 4],
        ["factory.<locals>.Product.describe.<locals>.helper", 1, 5],
    ]


def test_global_function_gets_top_level_qualname(tmp_path: Path) -> None:
    source = """
        def install():
            global handler
            def handler():
                def step():
                    pass
    """
    result = analyze_source(tmp_path, source)

    assert result["complexities"] == [
        ["install", 1, 2],
        ["handler", 1, 4],
        ["handler.<locals>.step", 1, 5],
    ]


def test_decorated_function_lineno_is_def_line(tmp_path: Path) -> None:
    source = """
        @first
        @second
        def f():
            pass
    """
    result = analyze_source(tmp_path, source)

    assert result["complexities"] == [["f", 1, 4]]


@pytest.mark.skipif(sys.version_info < (3, 11), reason="co_qualname needs Python 3.11")
def test_qualnames_match_compiled_code_objects(tmp_path: Path) -> None:
    source = """
        import functools

        def top(a):
            def middle():
                class Local:
                    def method(self):
                        return [x for x in a]
                    async def coroutine(self):
                        pass
                return Local
            return middle

        class Shape:
            def area(self):
                return 0
            class Meta:
                @staticmethod
                def build():
                    def nested():
                        pass
                    return nested
    """
    result = analyze_source(tmp_path, source)
    code = compile((tmp_path / "module.py").read_bytes(), "module.py", "exec")

    expected = []
    pending = [code]
    while pending:
        current = pending.pop()
        for const in current.co_consts:
            if inspect.iscode(const):
                pending.append(const)
                # Function bodies are optimized code objects but class bodies are not.
                # Comprehensions and lambdas have names in angle brackets.
                if const.co_flags & inspect.CO_OPTIMIZED and not const.co_name.startswith("<"):
                    expected.append(const.co_qualname)

    complexities = result["complexities"]
    assert isinstance(complexities, list)
    assert sorted(entry[0] for entry in complexities) == sorted(expected)


# Counts of functions, classes, imports and lines.


def test_counts_functions_classes_and_imports(tmp_path: Path) -> None:
    source = """
        import os, sys
        from collections import (
            OrderedDict,
            defaultdict,
        )

        class Base:
            class Options:
                pass

            def method(self):
                import json
                def helper():
                    pass

        async def fetch():
            pass
    """
    result = analyze_source(tmp_path, source)

    assert result["functions"] == 3
    assert result["classes"] == 2
    assert result["imports"] == 3
    assert result["error"] is None


def test_analyze_file_returns_path_as_given(tmp_path: Path) -> None:
    write_file(tmp_path, "pkg/sub/mod.py", "x = 1\n")

    result = analyze_file(str(tmp_path), "pkg/sub/mod.py")

    assert result == {
        "path": "pkg/sub/mod.py",
        "lines": 1,
        "functions": 0,
        "classes": 0,
        "imports": 0,
        "complexities": [],
        "error": None,
    }


@pytest.mark.parametrize(
    ("content", "expected_lines"),
    [
        (b"", 0),
        (b"a = 1\n", 1),
        (b"a = 1\nb = 2", 2),
        (b"a = 1\n\n\nb = 2\n", 4),
        (b"a = 1\r\nb = 2\r\n", 2),
        (b"a = 1\rb = 2\r", 2),
    ],
)
def test_line_count_counts_newline_separated_lines(
    tmp_path: Path, content: bytes, expected_lines: int
) -> None:
    result = analyze_source(tmp_path, content)

    assert result["lines"] == expected_lines


def test_line_count_ignores_form_feed(tmp_path: Path) -> None:
    # str.splitlines would also split at the form feed and report 4.
    result = analyze_source(tmp_path, b"a = 1\n\x0c\nb = 2\n")

    assert result["lines"] == 3


# Files that cannot be read, decoded or parsed.


def test_syntax_error_is_reported_not_raised(tmp_path: Path) -> None:
    result = analyze_source(tmp_path, "def f(:\n    pass\n")

    error = result.pop("error")
    assert isinstance(error, str)
    assert error.startswith("SyntaxError: ")
    assert "line 1" in error
    assert result == {
        "path": "module.py",
        "lines": 0,
        "functions": 0,
        "classes": 0,
        "imports": 0,
        "complexities": [],
    }


def test_null_byte_is_reported(tmp_path: Path) -> None:
    result = analyze_source(tmp_path, b"def f():\n    return 1\x00\n")

    error = result["error"]
    assert isinstance(error, str)
    # CPython raises SyntaxError for null bytes since 3.12 and later 3.11 releases
    # (3.11.7 does), and ValueError before.
    assert error.split(":")[0] in ("SyntaxError", "ValueError")
    assert "null bytes" in error
    assert result["functions"] == 0


def test_latin1_coding_cookie_is_honoured(tmp_path: Path) -> None:
    source = b"# -*- coding: latin-1 -*-\ndef greet():\n    return 'caf\xe9'\n"

    result = analyze_source(tmp_path, source)

    assert result["error"] is None
    assert result["complexities"] == [["greet", 1, 2]]
    assert result["lines"] == 3


def test_undecodable_file_is_reported(tmp_path: Path) -> None:
    result = analyze_source(tmp_path, b"name = 'caf\xe9'\n")

    error = result["error"]
    assert isinstance(error, str)
    assert error.startswith("SyntaxError: ")
    assert "utf-8" in error
    assert result["lines"] == 0


def test_unknown_coding_cookie_is_reported(tmp_path: Path) -> None:
    result = analyze_source(tmp_path, b"# coding: no-such-codec\nx = 1\n")

    error = result["error"]
    assert isinstance(error, str)
    assert error.startswith("SyntaxError: unknown encoding: no-such-codec")


def test_missing_file_is_reported(tmp_path: Path) -> None:
    result = analyze_file(str(tmp_path), "absent.py")

    missing = os.path.join(str(tmp_path), "absent.py")
    assert result["error"] == f"FileNotFoundError: [Errno 2] No such file or directory: {missing!r}"
    assert result["path"] == "absent.py"


def test_directory_path_is_reported(tmp_path: Path) -> None:
    (tmp_path / "package.py").mkdir()

    result = analyze_file(str(tmp_path), "package.py")

    error = result["error"]
    assert isinstance(error, str)
    assert error.startswith("IsADirectoryError: ")


def test_too_deeply_nested_expression_is_reported(tmp_path: Path) -> None:
    result = analyze_source(tmp_path, "x = 1" + " + 1" * 100_000 + "\n")

    # CPython 3.11.7 raises RecursionError while it builds the AST. Other versions may
    # reject such input with MemoryError or SyntaxError.
    error = result["error"]
    assert isinstance(error, str)
    assert error.split(":")[0] in ("RecursionError", "MemoryError", "SyntaxError")
    assert "\n" not in error


def test_invalid_escape_sequence_parses_without_warning(tmp_path: Path) -> None:
    source = "def f():\n    return '\\d'\n"

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        result = analyze_source(tmp_path, source)

    assert caught == []
    assert result["error"] is None


def test_warnings_as_errors_do_not_fail_parsing(tmp_path: Path) -> None:
    source = "def f():\n    return '\\d'\n"

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        result = analyze_source(tmp_path, source)

    assert result["error"] is None
    assert result["complexities"] == [["f", 1, 1]]


# Listing files.


def test_lists_python_files_sorted_with_slash_paths(tmp_path: Path) -> None:
    for relpath in ("b.py", "a/z.py", "a/b/c.py", "A.py", "notes.txt", "a/b/data.pyc"):
        write_file(tmp_path, relpath, "")

    assert list_python_files(str(tmp_path)) == ["A.py", "a/b/c.py", "a/z.py", "b.py"]


def test_skips_package_cache_and_hidden_directories(tmp_path: Path) -> None:
    for relpath in (
        "site-packages/lib.py",
        "dist-packages/lib.py",
        "__pycache__/mod.py",
        ".venv/lib/python3/mod.py",
        "pkg/.git/hook.py",
        "pkg/sub/site-packages/lib.py",
        "pkg/mod.py",
        ".hidden_file.py",
    ):
        write_file(tmp_path, relpath, "")

    assert list_python_files(str(tmp_path)) == [".hidden_file.py", "pkg/mod.py"]


def test_does_not_follow_directory_symlinks(tmp_path: Path) -> None:
    outside = tmp_path / "outside"
    write_file(outside, "elsewhere.py", "")
    root = tmp_path / "root"
    write_file(root, "real.py", "")
    (root / "linked_dir").symlink_to(outside, target_is_directory=True)
    (root / "linked_file.py").symlink_to(root / "real.py")

    assert list_python_files(str(root)) == ["linked_file.py", "real.py"]


def test_skips_broken_symlinks_and_fifos(tmp_path: Path) -> None:
    write_file(tmp_path, "real.py", "")
    (tmp_path / "broken.py").symlink_to(tmp_path / "absent.py")
    os.mkfifo(tmp_path / "pipe.py")

    assert list_python_files(str(tmp_path)) == ["real.py"]


def test_missing_root_raises_file_not_found(tmp_path: Path) -> None:
    missing = str(tmp_path / "absent")

    with pytest.raises(FileNotFoundError, match="absent"):
        list_python_files(missing)


def test_file_as_root_raises_file_not_found(tmp_path: Path) -> None:
    path = write_file(tmp_path, "single.py", "")

    with pytest.raises(FileNotFoundError, match="single.py"):
        list_python_files(str(path))


# Summaries.


def test_empty_summary_has_zero_counts() -> None:
    assert empty_summary() == {
        "files": 0,
        "lines": 0,
        "functions": 0,
        "classes": 0,
        "imports": 0,
        "top_functions": [],
        "failed": [],
    }


def test_summarize_of_no_results_is_empty_summary() -> None:
    assert summarize([]) == empty_summary()


def test_summarize_sums_counts_and_lists_failures() -> None:
    results = [
        fake_result("b.py", [["g", 2, 5]]),
        failed_result("z.py", "SyntaxError: invalid syntax (z.py, line 1)"),
        fake_result("a.py", [["f", 1, 1], ["C.m", 4, 9]]),
        failed_result("c.py", "ValueError: bad"),
    ]

    assert summarize(results) == {
        "files": 4,
        "lines": 20,
        "functions": 3,
        "classes": 0,
        "imports": 2,
        "top_functions": [["a.py", "C.m", 4, 9], ["b.py", "g", 2, 5], ["a.py", "f", 1, 1]],
        "failed": [
            ["c.py", "ValueError: bad"],
            ["z.py", "SyntaxError: invalid syntax (z.py, line 1)"],
        ],
    }


def test_top_functions_break_ties_in_order() -> None:
    results = [
        fake_result("b.py", [["late", 5, 30], ["early", 5, 3], ["low", 1, 1]]),
        fake_result("a.py", [["z", 5, 7], ["y", 5, 7], ["big", 9, 100]]),
        fake_result("c.py", [["c", 6, 1]]),
    ]

    summary = summarize(results)

    assert summary["top_functions"] == [
        ["a.py", "big", 9, 100],
        ["c.py", "c", 6, 1],
        ["a.py", "y", 5, 7],
        ["a.py", "z", 5, 7],
        ["b.py", "early", 5, 3],
        ["b.py", "late", 5, 30],
        ["b.py", "low", 1, 1],
    ]


def test_top_functions_keep_ten_by_default() -> None:
    results = [fake_result(f"m{index:02}.py", [["f", index, 1]]) for index in range(12)]

    summary = summarize(results)

    assert summary["top_functions"] == [
        [f"m{index:02}.py", "f", index, 1] for index in range(11, 1, -1)
    ]


def test_top_zero_keeps_no_functions() -> None:
    summary = summarize([fake_result("a.py", [["f", 3, 1]])], top=0)

    assert summary["top_functions"] == []
    assert summary["functions"] == 1


def test_negative_top_raises_value_error() -> None:
    with pytest.raises(ValueError, match="-1"):
        summarize([], top=-1)
    with pytest.raises(ValueError, match="-1"):
        merge_summaries(empty_summary(), empty_summary(), top=-1)


def test_summarize_rejects_result_without_key() -> None:
    result = fake_result("a.py", [])
    del result["lines"]

    with pytest.raises(ValueError, match="'lines'"):
        summarize([result])


def test_summarize_rejects_malformed_complexity_entry() -> None:
    result = fake_result("a.py", [["f", "high", 1]])

    with pytest.raises(TypeError, match="a.py"):
        summarize([result])


# Merging summaries.


def build_sample_tree(root: Path) -> list[dict[str, object]]:
    """Write a tree with tied complexities and failed files, and analyze every file."""
    rng = random.Random(7)
    for index in range(14):
        lines = []
        for function_index in range(rng.randint(0, 5)):
            branches = rng.randint(0, 4)
            lines.append(f"def f{function_index}(x):")
            lines.extend(f"    if x == {branch}:\n        pass" for branch in range(branches))
            lines.append("    return x")
        write_file(root, f"pkg{index % 3}/mod{index}.py", "\n".join(lines) + "\n")
    write_file(root, "broken/syntax.py", "def f(:\n")
    write_file(root, "broken/nul.py", b"x = 1\x00\n")
    return [analyze_file(str(root), relpath) for relpath in list_python_files(str(root))]


def test_merge_matches_summarize_for_any_batching(tmp_path: Path) -> None:
    results = build_sample_tree(tmp_path)
    assert len(results) == 16
    rng = random.Random(11)

    for top in (3, 10):
        expected = summarize(results, top=top)
        for trial in range(20):
            shuffled = results[:]
            rng.shuffle(shuffled)
            cuts = sorted(rng.sample(range(1, len(shuffled)), rng.randint(0, 6)))
            batches = [
                shuffled[start:end]
                for start, end in zip([0, *cuts], [*cuts, len(shuffled)], strict=True)
            ]
            summaries = [summarize(batch, top=top) for batch in batches]
            rng.shuffle(summaries)

            assert merge_all(summaries, top) == expected, f"top={top} trial={trial}"


def test_tree_shaped_merge_matches_summarize(tmp_path: Path) -> None:
    results = build_sample_tree(tmp_path)
    summaries = [summarize([result], top=3) for result in results]

    while len(summaries) > 1:
        paired = [
            merge_summaries(summaries[index], summaries[index + 1], top=3)
            for index in range(0, len(summaries) - 1, 2)
        ]
        if len(summaries) % 2:
            paired.append(summaries[-1])
        summaries = paired

    assert summaries[0] == summarize(results, top=3)


def test_merge_is_commutative_and_associative(tmp_path: Path) -> None:
    results = build_sample_tree(tmp_path)
    a = summarize(results[:5], top=4)
    b = summarize(results[5:9], top=4)
    c = summarize(results[9:], top=4)

    assert merge_summaries(a, b, top=4) == merge_summaries(b, a, top=4)
    assert merge_summaries(merge_summaries(a, b, top=4), c, top=4) == merge_summaries(
        a, merge_summaries(b, c, top=4), top=4
    )


def test_merge_with_empty_summary_is_identity(tmp_path: Path) -> None:
    summary = summarize(build_sample_tree(tmp_path))

    assert merge_summaries(summary, empty_summary()) == summary
    assert merge_summaries(empty_summary(), summary) == summary


def test_merge_does_not_mutate_inputs(tmp_path: Path) -> None:
    results = build_sample_tree(tmp_path)
    a = summarize(results[:8])
    b = summarize(results[8:])
    a_before = copy.deepcopy(a)
    b_before = copy.deepcopy(b)

    merged = merge_summaries(a, b)

    assert a == a_before
    assert b == b_before
    top_functions = merged["top_functions"]
    failed = merged["failed"]
    assert isinstance(top_functions, list)
    assert isinstance(failed, list)
    top_functions[0].append("changed")
    failed[0].append("changed")
    assert a == a_before
    assert b == b_before


def test_summarize_does_not_mutate_results(tmp_path: Path) -> None:
    results = build_sample_tree(tmp_path)
    before = copy.deepcopy(results)

    summarize(results, top=2)

    assert results == before


def test_summary_survives_json_round_trip(tmp_path: Path) -> None:
    results = build_sample_tree(tmp_path)
    summary = merge_summaries(summarize(results[:7]), summarize(results[7:]))

    assert json.loads(json.dumps(summary)) == summary


def test_analyze_result_survives_json_round_trip(tmp_path: Path) -> None:
    source = "class A:\n    def m(self):\n        return [x for x in self if x]\n"
    result = analyze_source(tmp_path, source)

    assert json.loads(json.dumps(result)) == result


def test_json_package_merge_matches_summarize() -> None:
    root = os.path.dirname(json.__file__)
    paths = list_python_files(root)
    results = [analyze_file(root, path) for path in paths]

    per_file = [summarize([result]) for result in results]
    merged = merge_all(per_file, top=10)

    assert "__init__.py" in paths
    assert merged == summarize(results)
    assert merged["files"] == len(paths)
    assert merged["failed"] == []
    assert json.loads(json.dumps(merged)) == merged
