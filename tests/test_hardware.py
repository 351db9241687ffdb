"""The hardware profile (`flexeval.planning.hardware`): interpolation between measured sizes, and a
profile measured once, cached, read back with overrides and measured again when damaged."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from flexeval import FlexevalError
from flexeval.planning import hardware
from flexeval.planning.hardware import interpolate
from tests.helpers import machine


def test_interpolation_is_linear_in_log_size_and_flat_beyond_the_measured_sizes():
    table = ((1, 10.0), (100, 30.0))
    assert interpolate(table, 10) == pytest.approx(20.0)
    assert interpolate(table, 0.5) == 10.0 and interpolate(table, 10**6) == 30.0


def test_a_profile_is_measured_once_then_read_back_with_overrides_and_fresh_memory(tmp_path: Path):
    calls = []

    def measure(device, offload):
        calls.append(device)
        return machine()

    first = hardware.profile(torch.device("cpu"), tmp_path, tmp_path / "cache", measure=measure)
    again = hardware.profile(torch.device("cpu"), tmp_path, tmp_path / "cache", {"disk_read": 2e9}, measure=measure)
    assert len(calls) == 1
    assert again.disk_read == 2e9 and again.gemm == first.gemm
    assert again.memory["disk"] == hardware.available_memory(torch.device("cpu"), tmp_path)["disk"]
    (written,) = (tmp_path / "cache" / "hardware").glob("*.json")
    assert json.loads(written.read_text())["disk_read"] == machine().disk_read
    with pytest.raises(FlexevalError, match="unknown figures \\['disk_speed'\\]"):
        hardware.profile(torch.device("cpu"), tmp_path, tmp_path / "cache", {"disk_speed": 1}, measure=measure)


def test_a_damaged_profile_is_measured_again(tmp_path: Path):
    hardware.profile(torch.device("cpu"), tmp_path, tmp_path / "c", measure=lambda d, o: machine())
    (written,) = (tmp_path / "c" / "hardware").glob("*.json")
    written.write_text("{not json")
    again = hardware.profile(
        torch.device("cpu"), tmp_path, tmp_path / "c", measure=lambda d, o: machine(op_seconds=1.0)
    )
    assert again.op_seconds == 1.0
