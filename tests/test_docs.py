"""The code in the docs runs as written."""

from __future__ import annotations

import re
from pathlib import Path

DOCS = Path(__file__).resolve().parent.parent / "docs"


def test_testing_guide_example_runs() -> None:
    """docs/testing.md's worked example passes, deterministically, twice."""
    text = (DOCS / "testing.md").read_text()
    block = re.search(r"```python\n(.*?)```", text, re.S)
    assert block is not None
    outputs = []
    for _ in range(2):
        namespace: dict[str, object] = {"__name__": "docs_example"}
        exec(compile(block.group(1), "docs/testing.md", "exec"), namespace)
        test = namespace["test_charges_survive_a_flaky_world"]
        assert callable(test)
        import contextlib
        import io

        buf = io.StringIO()
        with contextlib.redirect_stdout(buf):
            test()
        outputs.append(buf.getvalue())
    assert "faults injected" in outputs[0]
    assert outputs[0] == outputs[1]


def test_every_security_claim_names_a_test_that_exists() -> None:
    """Each test docs/security.md cites as a claim's proof is defined where it says."""
    text = (DOCS / "security.md").read_text()
    root = DOCS.parent
    cited = re.findall(r"`(tests/[\w/]+\.py)(?:::(\w+))?", text)
    assert len(cited) > 20
    for path, name in cited:
        source = (root / path).read_text()
        if name:
            assert re.search(rf"^(async )?def {name}\(", source, re.M), f"{path}::{name}"


def test_no_page_says_the_public_listener_serves_the_operator_surface() -> None:
    """Every paragraph of README.md and docs/ that puts `--http` beside `/_surge/` says
    where the operator surface is served (`--admin` or `SURGE_ADMIN_TOKEN`): the public
    listener of `surge run --http` alone serves none of it."""
    pages = [DOCS.parent / "README.md", *sorted(DOCS.glob("*.md"))]
    stale = [
        f"{page.name}: {para[:80]!r}"
        for page in pages
        for para in re.split(r"\n\s*\n", page.read_text())
        if "--http" in para
        and "/_surge" in para
        and "--admin" not in para
        and "SURGE_ADMIN_TOKEN" not in para
    ]
    assert stale == []


def test_ruff_security_rules_are_on_and_every_ignore_gives_its_reason() -> None:
    """pyproject selects ruff's S rules (CI's `ruff check .` runs them), and each S ignore,
    in pyproject or on a line of src/, carries a reason (on its line or the one above);
    none in src/ waives the rules against unpickling, marshal, eval or exec."""
    import tomllib

    root = DOCS.parent
    config = tomllib.loads((root / "pyproject.toml").read_text())["tool"]["ruff"]["lint"]
    assert "S" in config["select"]
    text = (root / "pyproject.toml").read_text()
    for line in text.splitlines():
        if re.match(r'\s*"S\d+",', line):
            assert "#" in line, line
    for path in sorted((root / "src").rglob("*.py")):
        lines = path.read_text().splitlines()
        for i, line in enumerate(lines):
            if "noqa: S" in line:
                reason = re.search(r"noqa: S\d+(,\s*S\d+)*\s*-\s*\S", line)
                above = lines[i - 1].strip().startswith("#")
                assert reason or above, f"{path.relative_to(root)}:{i + 1}"
            # unpickling, marshal, eval and exec (S301/S302/S307/S102) are never waived
            assert not re.search(r"noqa:[^#]*\bS(30[127]|102)\b", line), path
    waived = [c for pattern, codes in config["per-file-ignores"].items()
              if pattern.startswith("src") for c in codes]  # fmt: skip
    assert not {"S301", "S302", "S307", "S102"} & {*waived, *config["ignore"]}
