"""Storage-aware training's rounding: the same values as a stored file loads, however computed."""

from __future__ import annotations

import logging
import shutil

import pytest
import torch

from geosat2map import storage_aware, weights
from geosat2map.storage_aware import StoredRounding
from geosat2map.weights import int4_rounded, stored_value


@pytest.fixture
def coded(monkeypatch) -> torch.Tensor:
    """A convolution weight int4 storage codes in 4 bits, with values on, and one float step either
    side of, every level and every midpoint between levels, in groups of several scales."""
    monkeypatch.setattr(weights, "INT4_MIN_ELEMENTS", 4096)
    levels = weights.NF4_LEVELS
    midpoints = (levels[1:] + levels[:-1]) / 2
    exact = torch.cat([levels, midpoints])
    values = torch.cat([exact, torch.nextafter(exact, torch.tensor(2.0)), torch.nextafter(exact, torch.tensor(-2.0)),
                        torch.rand(4000) * 2 - 1])
    groups = torch.cat([torch.ones(len(values), 1), values[:, None].expand(-1, weights.INT4_GROUP - 1)], 1)
    groups = torch.cat([groups, groups * torch.logspace(-3, 0, len(values))[:, None]])  # scale 1, and ones fp16 rounds
    rows = -(-groups.numel() // (weights.INT4_GROUP * 64))
    flat = torch.cat([groups.reshape(-1), torch.randn(rows * weights.INT4_GROUP * 64 - groups.numel()) * 0.02])
    weight = flat.reshape(rows * 8, 8, 8, 8)
    assert weights.int4_coded(weight)
    return weight


def test_int4_rounded_is_the_stored_rounding_ties_and_all(coded):
    assert torch.equal(int4_rounded(coded), stored_value(coded, "int4"))


def rounded(rounding: StoredRounding, value: torch.Tensor) -> torch.Tensor:
    """``value`` as ``rounding`` rounds it in place (a copy of it: ``value`` itself is kept)."""
    param = value.clone()
    rounding.round_([param])
    return param


@pytest.mark.skipif(shutil.which("g++") is None and shutil.which("c++") is None,
                    reason="torch.compile needs a C++ compiler on the CPU")
def test_the_compiled_rounding_is_used_where_it_compiles_and_gives_the_stored_values(coded):
    rounding = StoredRounding("int4", torch.device("cpu"))
    small = torch.randn(8, 4, 3, 3)  # not coded in 4 bits: stored as int8 storage does
    # laid out as the benchmark's channels_last steps lay them out
    channels_last = (coded * 0.5).contiguous(memory_format=torch.channels_last)
    exact = [coded, small, channels_last]
    params = [t.clone(memory_format=torch.preserve_format) for t in exact]
    rounding.round_(params)
    assert rounding.fused is True
    assert all(torch.equal(p, stored_value(t, "int4")) for p, t in zip(params, exact))
    assert params[2].is_contiguous(memory_format=torch.channels_last)  # rounded in its own layout
    rounding.restore_(params)
    assert all(torch.equal(p, t) for p, t in zip(params, exact))
    assert torch.equal(rounded(rounding, coded * 2), stored_value(coded * 2, "int4"))  # the kept buffers again


def test_the_rounding_falls_back_to_the_stored_one_when_compiling_fails_or_differs(coded, monkeypatch, caplog):
    def fails(out, value):
        raise RuntimeError("no C++ compiler\nand many more lines")

    monkeypatch.setattr(storage_aware, "_compiled_int4_into", fails)
    rounding = StoredRounding("int4", torch.device("cpu"))
    with caplog.at_level(logging.WARNING, logger="geosat2map.storage_aware"):
        assert torch.equal(rounded(rounding, coded), stored_value(coded, "int4"))
    assert rounding.fused is False
    assert caplog.messages == ["storage-aware training rounds without torch.compile: "
                               "torch.compile failed (no C++ compiler)"]

    monkeypatch.setattr(storage_aware, "_compiled_int4_into", lambda out, value: out.copy_(value))  # differs
    rounding = StoredRounding("int4", torch.device("cpu"))
    assert torch.equal(rounded(rounding, coded), stored_value(coded, "int4")) and rounding.fused is False
    assert torch.equal(rounded(rounding, coded), stored_value(coded, "int4"))  # and stays on the stored rounding


def test_a_rounding_failing_part_way_puts_every_exact_value_back(coded, monkeypatch):
    """The exact values are swapped out one parameter at a time; a failure after the first (a
    Ctrl-C in the middle, say) left it rounded, and the next optimiser step would have started
    from the rounded value."""
    from torch import nn

    from geosat2map.storage_aware import rounded_as_stored

    module = nn.Module()
    module.first = nn.Parameter(coded.clone())
    module.second = nn.Parameter(torch.randn(8, 4, 3, 3))
    exact = [p.detach().clone() for p in module.parameters()]
    rounding = StoredRounding("int4", torch.device("cpu"))
    done = []
    real = rounding._round

    def fails_on_the_second(param, value):
        if done:
            raise KeyboardInterrupt
        real(param, value)
        done.append(param)

    monkeypatch.setattr(rounding, "_round", fails_on_the_second)
    with pytest.raises(KeyboardInterrupt), rounded_as_stored(module, rounding):
        pass
    assert done and all(torch.equal(p, e) for p, e in zip(module.parameters(), exact))
    monkeypatch.setattr(rounding, "_round", real)
    with rounded_as_stored(module, rounding):  # and the next step rounds as ever
        assert torch.equal(module.first, stored_value(exact[0], "int4"))
    assert all(torch.equal(p, e) for p, e in zip(module.parameters(), exact))
