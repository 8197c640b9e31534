"""The documentation site builds with `mkdocs build --strict` (mkdocs.yml)."""

from __future__ import annotations

import asyncio
import contextlib
import io
import logging
import re
from pathlib import Path

import pytest
from mkdocs.commands.build import build
from mkdocs.config import load_config
from mkdocs.exceptions import Abort

import surge

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(autouse=True)
def _quiet(monkeypatch: pytest.MonkeyPatch) -> None:
    # mkdocs-material prints a notice about MkDocs 2 on each build unless told not to
    monkeypatch.setenv("NO_MKDOCS_2_WARNING", "1")


def _build(config: Path, site: Path) -> None:
    """``mkdocs build --strict -f config -d site``, in this process (one
    import of mkdocs and the theme for every build of the session)."""
    build(load_config(config_file=str(config), strict=True, site_dir=str(site)))


def test_the_site_builds_strict_with_every_page_in_the_nav(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Every docs/*.md is in the nav, and no link or anchor is broken."""
    with caplog.at_level(logging.WARNING, logger="mkdocs"):
        _build(ROOT / "mkdocs.yml", tmp_path / "site")
    assert [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING] == []
    for page in sorted(p.stem for p in (ROOT / "docs").glob("*.md")):
        built = tmp_path / "site" / ("index.html" if page == "index" else f"{page}/index.html")
        assert built.is_file(), page


def test_a_broken_anchor_fails_the_build(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """strict mode turns a link to a missing heading into a failed build."""
    docs = tmp_path / "docs"
    docs.mkdir()
    (docs / "index.md").write_text("# Home\n\nSee [limits](other.md#no-such-heading).\n")
    (docs / "other.md").write_text("# Other\n\n## Limits\n")
    config = tmp_path / "mkdocs.yml"
    # the repository's own settings, on two pages of its own
    text = (ROOT / "mkdocs.yml").read_text()
    text = text.split("\nnav:")[0] + "\nnav:\n  - index.md\n  - other.md\n"
    config.write_text(text.replace("docs_dir: docs", f"docs_dir: {docs}"))
    with caplog.at_level(logging.WARNING, logger="mkdocs"), pytest.raises(Abort):
        _build(config, tmp_path / "site")
    assert any("no-such-heading" in r.getMessage() for r in caplog.records)


def test_the_home_page_example_runs() -> None:
    """docs/index.md's app, as written, charges an order and ships it."""
    text = (ROOT / "docs" / "index.md").read_text()
    block = re.search(r"```python\n(.*?)```", text, re.S)
    assert block is not None
    namespace: dict[str, object] = {"__name__": "docs_index"}
    exec(compile(block.group(1), "docs/index.md", "exec"), namespace)
    app = namespace["app"]
    placed = namespace["OrderPlaced"]
    assert isinstance(app, surge.App)
    assert isinstance(placed, type)

    async def main() -> None:
        async with app:
            await app.publish(placed(order_id="o-1", amount=9.5))
            await app.drain()

    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        asyncio.run(main())
    assert out.getvalue() == "shipping o-1\n"
