"""`difflm sample` / `eval` flags are made from the typed options (commands/flags.py): same names and
defaults as the options, choices from the registries, help from the field declarations."""

from __future__ import annotations

import argparse
import dataclasses

import pytest

from difflm.cli import build_parser
from difflm.commands.flags import add_flags, options_from
from difflm.evaluate.options import EvalOptions, HarnessOptions
from difflm.evaluate.poem_completion import PoemOptions
from difflm.fields import opt
from difflm.sampling.settings import CACHE_MODES, REMASKING, REVEAL_SCHEDULES, SampleConfig, SampleOptions


def parsed(command: str, *argv: str) -> argparse.Namespace:
    return build_parser(command).parse_args([command, "ckpt", *argv])


def test_no_flags_give_the_default_options():
    args = parsed("sample")
    assert options_from(SampleOptions, args) == SampleOptions()
    assert SampleOptions().gen_length == 128 and SampleOptions().steps is None  # the command line's defaults
    args = parsed("eval")
    assert options_from(EvalOptions, args) == EvalOptions()
    assert options_from(HarnessOptions, args) == HarnessOptions()
    assert options_from(PoemOptions, args) == PoemOptions()


def test_flags_fill_the_options():
    args = parsed("sample", "--gen-length", "8", "--prompt", "a", "--prompt", "b", "--interpolate", "x", "y")
    opts = options_from(SampleOptions, args)
    assert opts.gen_length == 8 and opts.prompt == ["a", "b"] and opts.interpolate == ("x", "y")
    assert not opts.trace and options_from(SampleOptions, parsed("sample", "--live")).trace
    assert args.checkpoint == "ckpt"


def test_choices_come_from_the_registries_and_help_from_the_config():
    actions = {
        a.dest: a for a in build_parser("sample")._subparsers._group_actions[0].choices["sample"]._actions
    }
    assert tuple(actions["cache"].choices) == CACHE_MODES
    assert tuple(actions["remasking"].choices) == REMASKING
    assert tuple(actions["reveal_schedule"].choices) == REVEAL_SCHEDULES
    threshold = next(f for f in dataclasses.fields(SampleConfig) if f.name == "threshold")
    assert actions["threshold"].help == threshold.metadata["help"]
    with pytest.raises(SystemExit):
        parsed("sample", "--cache", "sometimes")


def test_a_field_without_a_flag_kind_is_refused():
    @dataclasses.dataclass
    class Odd:
        table: dict = opt({}, "no flag can hold this")

    with pytest.raises(TypeError, match="no command-line flag"):
        add_flags(argparse.ArgumentParser(), Odd)
