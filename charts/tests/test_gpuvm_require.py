"""The GPUVM_REQUIRE rule in Python agrees with the Rust one (gpuvm-testkit)."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

import gpuvm_require
from gpuvm_require import REQUIREMENTS, RequireError, parse

TESTKIT = Path(__file__).resolve().parents[2] / "testkit" / "src" / "lib.rs"


def test_names_are_testkits():
    source = TESTKIT.read_text()
    rust = re.findall(r'Requirement::\w+ => "([a-z-]+)"', source)
    assert rust, "no Requirement names found in testkit/src/lib.rs"
    assert tuple(rust) == REQUIREMENTS


def test_parses_lists_all_and_empty():
    assert parse("apiserver, cloud-hypervisor") == {"apiserver", "cloud-hypervisor"}
    assert parse("all") == set(REQUIREMENTS)
    assert parse(" , ") == set()
    assert parse("") == set()


def test_an_unknown_name_is_an_error_that_lists_the_known_ones():
    with pytest.raises(RequireError) as err:
        parse("apiserver,cloudhypervisor")
    assert '"cloudhypervisor"' in str(err.value)
    assert "cloud-hypervisor" in str(err.value)


def test_skip_skips_or_fails(monkeypatch):
    monkeypatch.setenv("GPUVM_REQUIRE", "qemu")
    with pytest.raises(pytest.skip.Exception):
        gpuvm_require.skip("apiserver", "no API server")
    with pytest.raises(pytest.fail.Exception) as err:
        gpuvm_require.skip("qemu", "no QEMU")
    assert "GPUVM_REQUIRE requires qemu, but it is missing: no QEMU" in str(err.value)
    monkeypatch.setenv("GPUVM_REQUIRE", "all")
    with pytest.raises(pytest.fail.Exception):
        gpuvm_require.skip("apiserver", "no API server")


def test_an_unknown_name_stops_the_whole_run(tmp_path):
    """conftest.py checks GPUVM_REQUIRE before any test runs: pytest exits with a usage
    error instead of running (and skipping) tests."""
    (tmp_path / "test_x.py").write_text("def test_x():\n    pass\n")
    here = Path(__file__).resolve().parent
    (tmp_path / "conftest.py").write_text((here / "conftest.py").read_text())
    env = {"GPUVM_REQUIRE": "apiservr", "PYTHONPATH": str(here), "PATH": "/usr/bin:/bin",
           "PYTHONDONTWRITEBYTECODE": "1"}
    out = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
                          str(tmp_path)], capture_output=True, text=True, env=env)
    assert out.returncode == 4, out.stdout + out.stderr
    assert '"apiservr"' in out.stderr, out.stderr
