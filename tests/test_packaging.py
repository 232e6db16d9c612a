"""requirements.txt pins what pyproject.toml asks for, so a reproducible install is the tested one."""

import re
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def name(requirement):
    return re.split(r"[<>=!~;\[ ]", requirement.strip(), maxsplit=1)[0].lower().replace("_", "-").replace(".", "-")


def test_every_dependency_is_pinned_in_requirements_txt():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    wanted = {name(r) for r in project["dependencies"] + project["optional-dependencies"]["test"]}
    lines = [l for l in (ROOT / "requirements.txt").read_text().splitlines() if l.strip() and not l.startswith("#")]
    assert all(re.match(r"^[A-Za-z0-9_.\-]+==[^=;\s]+", l) for l in lines), "every line pins one version"
    pinned = {name(l) for l in lines}
    assert wanted <= pinned, f"not pinned in requirements.txt: {sorted(wanted - pinned)}"
