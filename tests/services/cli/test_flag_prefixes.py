"""Every `dflash` command takes its flags spelled out: a prefix is an error, never another flag.

Why it matters: with argparse's default, `dflash control-plane --token SECRET` was read as
`--token-file SECRET`, and the error about the unreadable file printed the secret back.
"""

from __future__ import annotations

import argparse

import pytest

from services.cli.main import build_parser


def _commands(parser: argparse.ArgumentParser, words: tuple[str, ...] = ()):
    """(command words, parser) for every command that parses flags, nested ones included."""
    subcommands = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    if not subcommands:
        yield words, parser
    for action in subcommands:
        for name, sub in action.choices.items():
            yield from _commands(sub, (*words, name))


def test_a_prefix_of_a_flag_is_refused_in_every_command():
    checked = set()
    for words, parser in _commands(build_parser()):
        flags = {o for a in parser._actions for o in a.option_strings if o.startswith("--")}
        # What the command requires is given first, so a prefix left over is all it can object to.
        given = [
            word
            for a in parser._actions
            if a.required or (not a.option_strings and a.nargs != "?")
            for word in ([a.option_strings[0], "x"] if a.option_strings else ["x"])
        ]
        for flag in sorted(flags):
            prefix = flag[:-1]
            if prefix in flags or len(prefix) < 4:
                continue
            _, left_over = parser.parse_known_args([*given, prefix])
            assert left_over == [prefix], (words, flag)
            checked.add(words)
    assert len(checked) > 10  # every command, and healthcheck's kinds


def test_the_control_plane_token_is_never_read_through_a_prefix(capsys):
    with pytest.raises(SystemExit):
        build_parser().parse_args(["control-plane", "--token", "s3cret-value"])
    assert "unrecognized arguments: --token s3cret-value" in capsys.readouterr().err
