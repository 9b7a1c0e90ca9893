"""Every flag of every subcommand is set on a command line by some test.

The check reads the tests' source: a flag counts as tested where one function holds both
the flag and the name of a subcommand that has it, as string literals (a command line
written out, in-process through ``tests.pipelines.conftest.cli`` or as a subprocess). A
flag that several subcommands share with the same help text is one setting read by the
same code, and counts once; one whose help differs (``--workers`` of ``run`` and of
``train``) means something else in each, and each needs its own test. What each test
asserts about the flag's effect is for a reviewer to read; this keeps a new flag from
going untested unnoticed.
"""

from __future__ import annotations

import argparse
import ast
from collections import defaultdict
from pathlib import Path

TESTS = Path(__file__).parent
NOT_SETTINGS = {"-h", "--help"}


def subcommand_flags() -> dict[tuple[str, str], set[str]]:
    """(flag, help text) -> the subcommands that have it; the global flags under ''."""
    from pseudolabel.pipelines.cli import build_parser

    parser = build_parser()
    found: dict[tuple[str, str], set[str]] = defaultdict(set)
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for command, sub in action.choices.items():
                for option in sub._actions:
                    for flag in option.option_strings:
                        found[flag, option.help or ""].add(command)
        for flag in action.option_strings:
            found[flag, action.help or ""].add("")
    return found


def literals_by_function() -> dict[str, set[str]]:
    """'file::function' -> the strings that function writes into an argument list: the
    string constants among a list's, a tuple's or a call's arguments (``tmp_path / "run"``
    names a folder, not the run command), for every test file."""
    out = {}
    for path in sorted(TESTS.rglob("*.py")):
        tree = ast.parse(path.read_text(), filename=str(path))
        for node in ast.walk(tree):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                out[f"{path.relative_to(TESTS)}::{node.name}"] = {
                    item.value
                    for n in ast.walk(node)
                    for item in _arguments(n)
                    if isinstance(item, ast.Constant) and isinstance(item.value, str)
                }
    return out


def _arguments(node: ast.AST) -> list[ast.AST]:
    if isinstance(node, (ast.List, ast.Tuple)):
        return list(node.elts)
    if isinstance(node, ast.Call):
        return list(node.args)
    return []


def test_every_flag_is_set_on_a_command_line_by_some_test():
    functions = literals_by_function().values()
    untested = []
    for (flag, _), commands in subcommand_flags().items():
        if flag in NOT_SETTINGS:
            continue
        if not any(flag in seen and ("" in commands or commands & seen) for seen in functions):
            untested.append(f"{flag} ({', '.join(sorted(commands))})")
    assert untested == [], "flags that no test sets on a command line: " + "; ".join(untested)


def test_the_check_sees_a_flag_only_with_its_command():
    """The check itself: a flag only ``train`` has, found with ``train`` in the test that
    sets it, and a folder named "run" not taken for the run command."""
    flags = subcommand_flags()
    assert [commands for (flag, _), commands in flags.items() if flag == "--hidden"] == [{"train"}]
    train = literals_by_function()[
        "pipelines/test_train.py::test_train_compare_rounds_checkpoint_and_resume"
    ]
    assert {"train", "--hidden"} <= train and "run" not in train
