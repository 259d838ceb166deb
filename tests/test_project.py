"""Project-level rules: what CI's log shows, and how the package's layers import each other."""
import re
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_make_test_prints_pytest_summary_line():
    """pytest hides its `N passed` line at -qq: the Makefile's -q and the config's addopts together
    must not quieten it twice."""
    addopts = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["pytest"]["ini_options"].get("addopts", "")
    recipe = re.search(r"^test:.*\n((?:\t.*\n)+)", (ROOT / "Makefile").read_text(), re.M).group(1)
    command = next(line for line in recipe.splitlines() if "pytest" in line)
    quiet = sum(arg.count("q") for arg in (command + " " + addopts).split() if re.fullmatch(r"-q+", arg))
    assert quiet <= 1, f"pytest runs at -{'q' * quiet}: its summary line is hidden"
