"""Section citations resolve to docs/maths.md, and nothing names files outside the repository.

Every `§N` or `§N.M` in the code, configs, benchmarks, launch scripts, tests, README and docs
must be a heading of docs/maths.md (`## N. Title` or `### N.M Title`), and none of those files
may point at the team's private spec files, which a user of the repository does not have.
The section sign and the forbidden names are spelt out by code here, so that this file passes
its own checks."""
import glob
import os
import re

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
MATHS = os.path.join(REPO, "docs", "maths.md")

SECTION_SIGN = "\u00a7"
CITATION = re.compile(SECTION_SIGN + r"\s?(\d+(?:\.\d+)*)")
HEADING = re.compile(r"^#{2,3} (\d+(?:\.\d+)*)\.? ")
# Paths and names of the private spec, built so that they do not appear in this file.
FORBIDDEN = ("../" + "shared", "shared" + "/spec", "mcm" + ".md", "baselines_and_text" + ".md",
             "teachers_and_backbones" + ".md")
# A section of the spec rather than of docs/maths.md ("spec 7.1", "baselines 2.1" with the sign).
FOREIGN_CITATION = re.compile(r"\b(?:spec|baselines)\s+" + SECTION_SIGN, re.IGNORECASE)

PATTERNS = ("multistep_cm/**/*.py", "configs/*.py", "benchmarks/*.py", "launch/*",
            "tests/**/*.py", "README.md", "docs/*.md")


def headings(text: str) -> set[str]:
  """The section numbers of a markdown page's `##` and `###` headings."""
  return {m.group(1) for line in text.splitlines() if (m := HEADING.match(line))}


def citations(text: str):
  """`(line number, section)` for every section citation in `text`, trailing dot stripped."""
  for number, line in enumerate(text.splitlines(), 1):
    for m in CITATION.finditer(line):
      yield number, m.group(1).rstrip(".")


def _files() -> list[str]:
  found = set()
  for pattern in PATTERNS:
    found.update(p for p in glob.glob(os.path.join(REPO, pattern), recursive=True)
                 if os.path.isfile(p))
  return sorted(found)


def _read(path: str) -> str:
  with open(path, encoding="utf-8") as fh:
    return fh.read()


def test_heading_parser_finds_known_sections_and_rejects_made_up_ones():
  known = headings(_read(MATHS))
  assert {"1", "3.6", "5.5", "14.1", "16.3"} <= known
  assert "99.9" not in known
  sample = "## 2. Title\n### 2.1 Sub\n#### 2.1.1 Too deep\n"
  assert headings(sample) == {"2", "2.1"}
  cited = list(citations(f"see {SECTION_SIGN}5.5. and {SECTION_SIGN} 99.9, eq. 5\n"))
  assert cited == [(1, "5.5"), (1, "99.9")]
  assert FOREIGN_CITATION.search(f"(spec {SECTION_SIGN}7.1)")
  assert not FOREIGN_CITATION.search(f"(docs/maths.md {SECTION_SIGN}7.1)")


def test_every_section_citation_is_a_heading_of_maths_md():
  known = headings(_read(MATHS))
  files = _files()
  assert len(files) > 50, files  # the globs found the repository
  bad = [f"{os.path.relpath(path, REPO)}:{line}: {SECTION_SIGN}{section}"
         for path in files for line, section in citations(_read(path)) if section not in known]
  assert not bad, "citations with no heading in docs/maths.md:\n" + "\n".join(bad)


def test_nothing_names_the_private_spec():
  bad = []
  for path in _files() + [os.path.join(REPO, "setup.py")] + glob.glob(os.path.join(REPO, ".ci", "*")):
    if os.path.abspath(path) == MATHS or not os.path.isfile(path):
      continue
    for number, line in enumerate(_read(path).splitlines(), 1):
      bad += [f"{os.path.relpath(path, REPO)}:{number}: {name}" for name in FORBIDDEN
              if name in line]
      if FOREIGN_CITATION.search(line):
        bad.append(f"{os.path.relpath(path, REPO)}:{number}: {line.strip()}")
  assert not bad, "files name the private spec (cite docs/maths.md instead):\n" + "\n".join(bad)
