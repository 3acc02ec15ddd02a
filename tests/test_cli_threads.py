"""The CLI's thread policy: inference commands ask OpenMP for a passive wait (unless the user chose
one), so that decoding next to a busy process keeps its speed; training keeps the default."""

from __future__ import annotations

import os

import pytest

from difflm.cli import main


@pytest.mark.parametrize(("command", "expected"), [("sample", "PASSIVE"), ("eval", "PASSIVE"), ("train", None)])
def test_inference_commands_default_to_a_passive_wait(monkeypatch, tmp_path, command, expected):
    monkeypatch.setenv("OMP_WAIT_POLICY", "unset by the test")  # so the test's end restores the original
    monkeypatch.delenv("OMP_WAIT_POLICY")
    assert main([command, str(tmp_path / "missing")]) != 0  # fails on the path, after the policy is set
    assert os.environ.get("OMP_WAIT_POLICY") == expected


def test_a_wait_policy_the_user_set_is_kept(monkeypatch, tmp_path):
    monkeypatch.setenv("OMP_WAIT_POLICY", "ACTIVE")
    main(["sample", str(tmp_path / "missing")])
    assert os.environ["OMP_WAIT_POLICY"] == "ACTIVE"
