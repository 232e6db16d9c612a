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


def test_the_wheel_carries_the_served_page(tmp_path):
    """`cxr serve` reads its page from the installed package: a non-editable install must have it."""
    import shutil
    import subprocess
    import sys
    import zipfile

    project = tmp_path / "project"  # a copy: building leaves build/ and *.egg-info beside the sources
    shutil.copytree(ROOT / "src", project / "src", ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
    for name in ("pyproject.toml", "README.md"):
        shutil.copy2(ROOT / name, project / name)
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "-w",
                    str(tmp_path / "dist"), str(project)], check=True, capture_output=True, timeout=300)
    (wheel,) = (tmp_path / "dist").glob("cxr-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    assert {"cxr/static/index.html", "cxr/static/app.js", "cxr/static/style.css",
            "cxr/static/swagger/swagger-ui-bundle.js", "cxr/static/swagger/swagger-ui.css",
            "cxr/bundle/metadata.schema.json", "cxr/data/findings.csv"} <= names


def test_every_subcommand_has_its_help_in_the_docs_and_the_readme_stays_short():
    from cxr.cli import build_parser

    commands = next(a for a in build_parser()._actions if a.dest == "command").choices
    documented = "\n".join(p.read_text() for p in (ROOT / "docs").glob("*.md"))
    missing = [c for c in commands if f"<!-- cxr-help {c} -->" not in documented]
    assert not missing, f"no docs page shows the --help of: {', '.join(missing)}"
    assert len((ROOT / "README.md").read_text().splitlines()) <= 250


def test_the_docs_dependencies_are_pinned():
    lines = [l for l in (ROOT / "requirements-docs.txt").read_text().splitlines() if l.strip() and not l.startswith("#")]
    assert all(re.match(r"^[A-Za-z0-9_.\-]+==[^=;\s]+$", l) for l in lines)
    assert {"mkdocs", "mkdocs-material", "mkdocstrings-python"} <= {name(l) for l in lines}
