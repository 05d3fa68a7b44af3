"""Print the lowest versions pyproject.toml admits, as pip constraints (`name==floor`, one a line).

    python tools/lowest_requirements.py > lowest.txt
    pip install -c lowest.txt "dist/fxsparse-0.1.0-py3-none-any.whl[test]"

Covers the dependencies and every optional extra, so the extras the `test` extra pulls in (Hugging Face,
Lightning, ...) are held at their floors too. A floor must be a release that exists on PyPI (write
`timm>=1.0.3`, not `timm>=1.0`): pip then installs exactly the floors, and tools/check.sh runs the fast
suite on them, so every floor pyproject.toml states is a tested one.
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10: the tomli backport, a dependency of fxsparse there
    import tomli as tomllib

ROOT = Path(__file__).resolve().parent.parent
# name, optional [extras], then the specifiers up to an optional "; marker"
REQUIREMENT = re.compile(r"^\s*([A-Za-z0-9][A-Za-z0-9._-]*)\s*(?:\[[^\]]*\])?\s*([^;]*?)\s*(?:;\s*(.+))?$")
FLOOR = re.compile(r">=\s*([0-9][^,\s]*)")


def lowest_constraints(pyproject: dict) -> list[str]:
    """`name==floor` (with its environment marker) for each requirement that states a floor."""
    project = pyproject["project"]
    requirements = list(project.get("dependencies", []))
    for extra in project.get("optional-dependencies", {}).values():
        requirements += extra
    pins: dict[str, str] = {}
    for text in requirements:
        match = REQUIREMENT.match(text)
        if match is None:
            raise SystemExit(f"cannot read the requirement {text!r} in pyproject.toml; write it as name>=floor")
        name, specifiers, marker = match.groups()
        if name.lower().replace("_", "-") == project["name"]:
            continue  # the package's own extras (fxsparse[plot]) are listed by themselves
        floor = FLOOR.search(specifiers)
        if floor is None:
            continue  # no floor stated: pip's choice
        pin = f"{name}=={floor.group(1)}" + (f"; {marker}" if marker else "")
        if pins.setdefault(name.lower(), pin) != pin:
            raise SystemExit(f"pyproject.toml states two floors for {name}: {pins[name.lower()]!r} and {pin!r}")
    return sorted(pins.values(), key=str.lower)


def main() -> int:
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))
    sys.stdout.write("".join(line + "\n" for line in lowest_constraints(pyproject)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
