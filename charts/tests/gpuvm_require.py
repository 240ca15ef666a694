"""The one rule for tests that need what a machine may lack, as the Rust crate
`gpuvm-testkit` (testkit/src/lib.rs) has it: print `SKIPPED: <reason>` and skip, unless
`GPUVM_REQUIRE` names the requirement (a comma list, or `all`), in which case fail.
An unknown name in `GPUVM_REQUIRE` is an error: a typo must not disable the check.
"""

from __future__ import annotations

import os
import sys

import pytest

REQUIRE_VAR = "GPUVM_REQUIRE"

# The names of testkit's `Requirement::ALL`, in its order (test_gpuvm_require.py checks
# that the two lists agree).
REQUIREMENTS = (
    "apiserver",
    "controller-manager",
    "kvm",
    "gpu",
    "cloud-hypervisor",
    "ch-openapi",
    "qemu",
    "containerd",
    "root",
    "cni",
    "gpu-image",
)


class RequireError(ValueError):
    """`GPUVM_REQUIRE` names something that is not a requirement."""


def parse(value: str) -> frozenset[str]:
    """The requirements a `GPUVM_REQUIRE` value names (`all` expands to every one)."""
    names: set[str] = set()
    for item in (s.strip() for s in value.split(",")):
        if not item:
            continue
        if item == "all":
            names.update(REQUIREMENTS)
        elif item in REQUIREMENTS:
            names.add(item)
        else:
            raise RequireError(
                f'{REQUIRE_VAR} names "{item}", which is not a requirement; '
                f"known: all, {', '.join(REQUIREMENTS)}"
            )
    return frozenset(names)


def required(requirement: str) -> bool:
    """Whether `GPUVM_REQUIRE` names `requirement` (or is `all`)."""
    if requirement not in REQUIREMENTS:
        raise RequireError(f"{requirement!r} is not a requirement; known: {', '.join(REQUIREMENTS)}")
    return requirement in parse(os.environ.get(REQUIRE_VAR, ""))


def skip(requirement: str, reason: str) -> None:
    """The test cannot run because `requirement` is missing: prints `SKIPPED: <reason>`
    and skips, or fails when `GPUVM_REQUIRE` names it. Does not return."""
    if required(requirement):
        pytest.fail(f"{REQUIRE_VAR} requires {requirement}, but it is missing: {reason}",
                    pytrace=False)
    # On the real stderr, past pytest's capture, like testkit's note().
    print(f"SKIPPED: {reason}", file=sys.__stderr__, flush=True)
    pytest.skip(reason)
