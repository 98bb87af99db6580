"""Warnings, errors and docs point only at files users have: the repository's own."""

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# Files that live outside the repository (the project's shared notes, the paper).
OUTSIDE = re.compile(r"FINDINGS\.md|ARCHITECTURE\.md|\bFINDINGS section|shared/docs|shared/paper")


def test_no_pointer_to_files_outside_the_repository():
  offenders = []
  for path in [*ROOT.glob("genemamba_jax/**/*.py"), *ROOT.glob("configs/*.py"),
               *ROOT.glob("launch/*"), ROOT / "README.md", *ROOT.glob("docs/**/*.md")]:
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
      if OUTSIDE.search(line):
        offenders.append(f"{path.relative_to(ROOT)}:{number}: {line.strip()}")
  assert not offenders, "\n".join(offenders)
