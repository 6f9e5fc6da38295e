"""Print pip constraints that pin every direct dependency of talk2dino to the lowest version it declares.

CI installs the package with these constraints into a second environment and runs the fast suite there, so
the lower end of every range in pyproject.toml is tested, not only the newest releases. A requirement
without a ``>=`` floor is an error: an unbounded range cannot be proven.

Usage: python .ci/floor-constraints.py EXTRA [EXTRA ...] > floor.txt   (extras as in pyproject.toml; the
package's self-references such as ``talk2dino[eval,serve]`` are followed)
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

import tomllib

REQUIREMENT = re.compile(r"^\s*([A-Za-z0-9_.\-]+)\s*(\[[^\]]*\])?\s*(.*?)\s*(;.*)?$")


def floors(extras: list[str]) -> dict[str, str]:
    """Map each direct requirement of the core and `extras` (followed through self-references) to its floor."""
    project = tomllib.loads((Path(__file__).resolve().parent.parent / "pyproject.toml").read_text())["project"]
    optional: dict[str, list[str]] = project.get("optional-dependencies", {})
    pending, seen_extras = list(extras), set()
    requirements = list(project["dependencies"])
    while pending:
        extra = pending.pop()
        if extra in seen_extras:
            continue
        if extra not in optional:
            sys.exit(f"floor-constraints: unknown extra {extra!r}; known: {', '.join(sorted(optional))}")
        seen_extras.add(extra)
        requirements.extend(optional[extra])
    out: dict[str, str] = {}
    for text in requirements:
        match = REQUIREMENT.match(text)
        if match is None:
            sys.exit(f"floor-constraints: cannot read the requirement {text!r}")
        name, nested, spec, _marker = match.groups()
        if name.lower() == project["name"].lower():
            pending_extras = [e.strip() for e in (nested or "[]")[1:-1].split(",") if e.strip()]
            for extra in pending_extras:
                if extra not in seen_extras:
                    seen_extras.add(extra)
                    requirements.extend(optional[extra])
            continue
        floor = re.search(r">=\s*([0-9][^,\s]*)", spec)
        if floor is None:
            sys.exit(f"floor-constraints: {text!r} has no '>=' floor; every direct dependency needs one")
        key = name.lower().replace("_", "-")
        if key in out and out[key] != floor.group(1):
            sys.exit(f"floor-constraints: {name} has two floors ({out[key]} and {floor.group(1)})")
        out[key] = floor.group(1)
    return out


def main() -> None:
    for name, version in sorted(floors(sys.argv[1:]).items()):
        sys.stdout.write(f"{name}=={version}\n")


if __name__ == "__main__":
    main()
