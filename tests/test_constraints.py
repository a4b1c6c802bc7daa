"""constraints.txt is kept current: every dependency of the extras the README's test command installs is pinned
there (==), the pin satisfies pyproject's range, and every pip install of that command uses the file."""

from __future__ import annotations

import re
import shlex
from pathlib import Path

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

try:
    import tomllib
except ImportError:  # Python 3.10
    from pip._vendor import tomli as tomllib

ROOT = Path(__file__).resolve().parents[1]


def readme_test_command(readme: str) -> str:
    """The command between the README's test-command markers (what .ci/run runs)."""
    block = readme.split("<!-- test-command -->", 1)[1].split("<!-- /test-command -->", 1)[0]
    return re.search(r"```bash\n(.*?)\n```", block, re.S).group(1)


def pins(constraints: str) -> dict[str, Version]:
    out: dict[str, Version] = {}
    for n, line in enumerate(constraints.splitlines(), 1):
        line = line.split("#", 1)[0].strip()
        if not line:
            continue
        req = Requirement(line)
        spec = list(req.specifier)
        assert len(spec) == 1 and spec[0].operator == "==", f"constraints.txt:{n}: {line!r} is not an exact pin"
        name = canonicalize_name(req.name)
        assert name not in out, f"constraints.txt:{n}: {req.name} pinned twice"
        out[name] = Version(spec[0].version)
    return out


def problems(pyproject: str, constraints: str, readme: str) -> list[str]:
    project = tomllib.loads(pyproject)["project"]
    pinned = pins(constraints)
    cmd = readme_test_command(readme)
    found: list[str] = []
    installs = [shlex.split(part) for part in cmd.split("&&") if re.search(r"\bpip install\b", part)]
    extras: list[str] = []
    for args in installs:
        if args[args.index("install") + 1:args.index("install") + 3] != ["-c", "constraints.txt"]:
            found.append(f"README test command: `{' '.join(args)}` does not install with -c constraints.txt")
        for arg in args:
            m = re.fullmatch(r"\.\[([\w,-]+)\]", arg)
            extras += m.group(1).split(",") if m else []
            if arg.startswith("torch=="):  # the explicit torch install must be the pinned torch
                if pinned.get("torch") != Version(arg.split("==", 1)[1]):
                    found.append(f"README installs {arg}, constraints.txt pins torch=={pinned.get('torch')}")
    if not extras:
        found.append("README test command: no `pip install -e '.[extras]'` found")
    unknown = set(extras) - set(project["optional-dependencies"])
    found += [f"README test command: pyproject has no extra [{e}]" for e in sorted(unknown)]
    wanted = list(project["dependencies"]) + [r for e in extras if e not in unknown
                                               for r in project["optional-dependencies"][e]]
    for line in wanted:
        req = Requirement(line)
        version = pinned.get(canonicalize_name(req.name))
        if version is None:
            found.append(f"constraints.txt: no pin for {req.name} (pyproject: {line!r})")
        elif not req.specifier.contains(version, prereleases=True):
            found.append(f"constraints.txt: {req.name}=={version} is outside pyproject's {line!r}")
    return found


def test_every_dependency_of_the_test_command_is_pinned_within_its_range():
    found = problems((ROOT / "pyproject.toml").read_text(), (ROOT / "constraints.txt").read_text(),
                     (ROOT / "README.md").read_text())
    assert not found, "\n".join(found) + "\n(README.md, 'Updating constraints.txt', says how to refresh the pins)"


def test_the_check_catches_a_missing_or_stale_pin_and_an_unconstrained_install():
    pyproject = '[project]\ndependencies = ["pydantic>=2.7,<3"]\n[project.optional-dependencies]\n' \
                'local = ["torch>=2.4", "peft>=0.21"]\ndev = ["pytest>=8"]\n'
    readme = "<!-- test-command -->\n```bash\npip install -c constraints.txt torch==2.13.0 && " \
             "pip install -c constraints.txt -e '.[local,dev]' && python -m pytest -q\n```\n<!-- /test-command -->\n"
    good = "pydantic==2.14.4\ntorch==2.13.0\npeft==0.21.2\npytest==9.2.0  # a comment\n"
    assert problems(pyproject, good, readme) == []
    assert problems(pyproject, good.replace("peft==0.21.2\n", ""), readme) == [
        "constraints.txt: no pin for peft (pyproject: 'peft>=0.21')"]
    assert "outside pyproject's 'pydantic>=2.7,<3'" in problems(pyproject, good.replace("2.14.4", "3.0.0"),
                                                                 readme)[0]
    assert "torch==2.13.0" in problems(pyproject, good.replace("torch==2.13.0", "torch==2.13.1"), readme)[0]
    unconstrained = readme.replace("-c constraints.txt -e", "-e")
    assert "does not install with -c constraints.txt" in problems(pyproject, good, unconstrained)[0]
    assert problems(pyproject, good, readme.replace("local,dev", "local,dev,serve")) == [
        "README test command: pyproject has no extra [serve]"]
