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


class _Warnings(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[str]]:
    """The repository's site, built once for this module; the warnings logged."""
    out = tmp_path_factory.mktemp("site")
    warnings = _Warnings()
    logger = logging.getLogger("mkdocs")
    level = logger.level
    logger.addHandler(warnings)
    logger.setLevel(logging.WARNING)
    try:
        with pytest.MonkeyPatch.context() as patch:
            patch.setenv("NO_MKDOCS_2_WARNING", "1")
            _build(ROOT / "mkdocs.yml", out)
    finally:
        logger.removeHandler(warnings)
        logger.setLevel(level)
    return out, warnings.messages


def test_the_site_builds_strict_with_every_page_in_the_nav(site: tuple[Path, list[str]]) -> None:
    """Every docs/*.md is in the nav, and no link or anchor is broken."""
    out, warnings = site
    assert warnings == []
    pages = sorted(p.stem for p in (ROOT / "docs").glob("*.md"))
    assert {"tutorial", "concepts", "operations", "reference"} <= set(pages)
    for page in pages:
        built = out / ("index.html" if page == "index" else f"{page}/index.html")
        assert built.is_file(), page
    assert not (out / "_ext").exists()  # the griffe extension is no page


def test_the_api_reference_renders_every_public_name_as_markdown(
    site: tuple[Path, list[str]],
) -> None:
    """docs/reference.md documents each class and function of surge.__all__
    and the public subpackages, and the docstrings' reStructuredText (roles, option lists,
    simple tables) arrives as Markdown: no role or table rule shows as text."""
    out, _ = site
    page = (out / "reference" / "index.html").read_text()
    for name in surge.__all__:
        if callable(getattr(surge, name)):  # classes and functions: constants have no heading
            assert f'id="surge.{name}"' in page, name
    for package in ("http", "testing", "observe", "triggers", "transports.sqlite"):
        assert f'id="surge.{package}"' in page, package
    assert re.search(r":(class|meth|func|mod|attr|data):", page) is None
    assert "=====" not in page
    # App's options list and the sqlite options table
    assert re.search(r"<dt><code>shutdown_timeout</code></dt>", page)
    assert re.search(r"<td><code>busy_timeout</code></td>", page)


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
