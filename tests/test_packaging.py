"""What a cluster installs: a torch range (its CUDA build), pytest only with the `test` extra,
tensorboard as an extra, and `make setup` keeping this machine's exact CPU wheel."""

from __future__ import annotations

import re
import tomllib

import pytest
from packaging.requirements import Requirement

from migm.cli import REPO_ROOT

PROJECT = tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())["project"]


def _requirements(names: list[str]) -> dict[str, Requirement]:
    return {Requirement(r).name: Requirement(r) for r in names}


def test_torch_is_a_range_and_pytest_is_not_a_runtime_dependency():
    deps = _requirements(PROJECT["dependencies"])
    torch = deps["torch"]
    assert not [s for s in torch.specifier if s.operator in ("==", "===")], torch
    assert torch.specifier.contains("2.13.0") and torch.specifier.contains("2.6.0"), torch
    assert "pytest" not in deps


def test_extras_hold_the_test_runner_and_tensorboard():
    extras = {k: _requirements(v) for k, v in PROJECT["optional-dependencies"].items()}
    assert "pytest" in extras["test"] and "tensorboard" in extras["tensorboard"]
    assert PROJECT["scripts"]["migm"] == "migm.cli:cli"


def test_make_setup_pins_the_cpu_wheel_as_a_constraint_and_installs_the_test_extra():
    makefile = (REPO_ROOT / "Makefile").read_text()
    pin = re.search(r"^TORCH_PIN := (\S+)$", makefile, re.M)
    assert pin and pin.group(1) == "torch==2.13.0"
    recipe = makefile[makefile.index("$(VENV)/.installed: pyproject.toml"):].split("\n\n")[0]
    assert re.search(r'install -q -c \$\(VENV\)/constraints.txt -e "\.\[test,tensorboard\]"', recipe), recipe
