"""The committed results tables and the README's results come from the training code beside them.

Each results table's header names the training-code hash (``mocosfl --version``) of the code that
produced it, and README "Results" names the hash its figures were measured at. These tests fail when
any of them names another hash than the code's own, so a change to training code cannot leave the
committed numbers stale unnoticed: regenerate them (README "Results": ``make results`` for each suite)
in the same change. So must ``reports/evidence.md`` (``make evidence``), and each table's ``.runs.json``
must hold every run behind it. The tables must also come from one commit: once every suite's runs are cached,
running the three suites again at the final commit rewrites them in minutes.

While a regeneration is under way, skip them with ``MOCOSFL_ALLOW_STALE_RESULTS=1 make test`` (or
``pytest -m "not freshness"``).
"""

from __future__ import annotations

import csv
import json
import os
import re
from pathlib import Path

import pytest

from mocosfl import identity

ROOT = Path(__file__).resolve().parents[1]
# The committed results tables README "Results" is written from.
COMMITTED = ["reports/results-cpu.md", "reports/results-cpu-long.md", "reports/results-cpu-privacy.md"]
# README's speed, memory, distributed, tuning and attack figures (`make evidence`): same training code as the tables.
EVIDENCE = "reports/evidence.md"
FIGURE = re.compile(r"(?<![\d.])\d+\.\d\d(?![\d])")  # a two-decimal figure, whole (not 1.73 in 41.73)
CODE_LINE = re.compile(r"^- Code: git (\S+?)(;| \*\*dirty\*\*)(.*)$", re.MULTILINE)
HASH = re.compile(r"training-code\s+hash\s+([0-9a-f]{12})")  # README wraps lines anywhere

pytestmark = pytest.mark.freshness
# On the checks of the committed files only: the parsing test below runs whatever the flag.
allow_stale = pytest.mark.skipif(
    os.environ.get("MOCOSFL_ALLOW_STALE_RESULTS") == "1",
    reason="MOCOSFL_ALLOW_STALE_RESULTS=1: committed results may be stale while they are regenerated",
)


def header_provenance(text: str) -> tuple[str, bool, str]:
    """(git commit, dirty, training-code hash) from a results table's ``- Code:`` header line."""
    m = CODE_LINE.search(text)
    if not m:
        raise ValueError("no '- Code: git <sha>; training-code hash <hash>' line in the header")
    h = HASH.search(m.group(0))
    if not h:
        raise ValueError(f"no training-code hash in the header line {m.group(0)!r}")
    return m.group(1), m.group(2) != ";", h.group(1)


def readme_results_section(text: str) -> str:
    """README's "## Results" section, up to the next second-level heading."""
    m = re.search(r"^## Results\n(.*?)(?=^## )", text, re.MULTILINE | re.DOTALL)
    if not m:
        raise ValueError("README.md has no '## Results' section")
    return m.group(1)


@allow_stale
@pytest.mark.parametrize("path", [*COMMITTED, EVIDENCE])
def test_committed_table_is_from_this_training_code(path: str) -> None:
    assert (ROOT / path).exists(), f"{path} is missing: regenerate it (README 'Results')"
    text = (ROOT / path).read_text()
    commit, dirty, code = header_provenance(text)
    assert not dirty, f"{path} was written by uncommitted training code (git {commit}, dirty): regenerate it"
    assert code == identity.code_hash(), (
        f"{path} is from training code {code}, the code here is {identity.code_hash()} (`mocosfl --version`): "
        f"regenerate it (README 'Results'), or set MOCOSFL_ALLOW_STALE_RESULTS=1 while that is under way"
    )


@allow_stale
def test_committed_tables_share_one_commit() -> None:
    commits = {path: header_provenance((ROOT / path).read_text())[0] for path in COMMITTED}
    assert len(set(commits.values())) == 1, f"the committed tables come from different commits: {commits}"


@allow_stale
def test_readme_results_name_this_training_code() -> None:
    section = readme_results_section((ROOT / "README.md").read_text())
    named = set(HASH.findall(section))
    assert named == {identity.code_hash()}, (
        f"README 'Results' names training-code hash(es) {sorted(named)}; the code here is {identity.code_hash()}"
    )


@allow_stale
@pytest.mark.parametrize("path", COMMITTED)
def test_committed_table_has_its_run_records(path: str) -> None:
    """Every run behind a table is in its committed ``.runs.json``, recorded by this training code."""
    table = ROOT / path
    with table.with_suffix(".csv").open() as f:
        lines = list(csv.DictReader(f))
    keys = {line["key"] for line in lines}
    records_file = table.with_suffix(".runs.json")
    assert records_file.exists(), f"{records_file.name} is missing: `make results` writes it beside {table.name}"
    records = json.loads(records_file.read_text())
    missing = sorted(keys - set(records))
    assert not missing, f"{records_file.name} lacks the runs {missing} of {table.name}"
    stale = sorted(k for k in keys if records[k].get("code_hash") != identity.code_hash())
    assert not stale, f"{records_file.name}: runs {stale} are from other training code than {identity.code_hash()}"
    for line in lines:  # the table's figures are its records' (not a record rewritten by another machine's cache)
        for metric in ("knn_top1", "linear_probe_top1"):
            assert float(line[metric]) == pytest.approx(records[line["key"]][metric], abs=1e-6), (
                f"{table.name}: {line['label']} seed {line['seed']} {metric} {line[metric]} differs from its record"
            )


def test_header_parsing_tells_fresh_from_stale_and_dirty() -> None:
    """The checks above can fail: a header with another hash, or a dirty one, is read as such."""
    fresh = f"# Results\n\n- Code: git abc1234567; training-code hash {identity.code_hash()} (`mocosfl --version`).\n"
    assert header_provenance(fresh) == ("abc1234567", False, identity.code_hash())
    dirty = "- Code: git abc1234567 **dirty** (uncommitted changes under mocosfl/); training-code hash 0123456789ab\n"
    assert header_provenance(dirty) == ("abc1234567", True, "0123456789ab")
    with pytest.raises(ValueError, match="no '- Code"):
        header_provenance("# Results\n\nno provenance here\n")
    assert readme_results_section("# x\n## Results\nhash here\n## Next\n") == "hash here\n"


@allow_stale
def test_readme_results_table_matches_the_committed_tables() -> None:
    """Every two-decimal figure in README 'Results''s table rows is in a committed table (no hand-copied typo,
    no figure left from an older run)."""
    section = readme_results_section((ROOT / "README.md").read_text())
    tables = set(FIGURE.findall("\n".join((ROOT / path).read_text() for path in COMMITTED)))
    rows = [line for line in section.splitlines() if line.startswith("|")]
    assert rows, "README 'Results' has no table"
    figures = {f for line in rows for f in FIGURE.findall(line)}
    missing = sorted(figures - tables)
    assert not missing, f"README 'Results' quotes figures no committed table has: {missing}"
