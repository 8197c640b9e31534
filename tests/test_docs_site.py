"""The documentation site builds with `mkdocs build --strict` (mkdocs.yml)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def _build(config: Path, site: Path) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "NO_MKDOCS_2_WARNING": "1"}
    return subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "-f", str(config), "-d", str(site)],
        capture_output=True,
        text=True,
        timeout=120,
        env=env,
        check=False,
    )


def test_the_site_builds_strict_with_every_page_in_the_nav(tmp_path: Path) -> None:
    """Every docs/*.md is in the nav, and no link or anchor is broken."""
    run = _build(ROOT / "mkdocs.yml", tmp_path / "site")
    assert run.returncode == 0, run.stderr
    assert "WARNING" not in run.stderr, run.stderr
    pages = sorted(p.stem for p in (ROOT / "docs").glob("*.md"))
    for page in pages:
        built = tmp_path / "site" / ("index.html" if page == "index" else f"{page}/index.html")
        assert built.is_file(), page


def test_a_broken_anchor_fails_the_build(tmp_path: Path) -> None:
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
    run = _build(config, tmp_path / "site")
    assert run.returncode != 0
    assert "no-such-heading" in run.stderr


def test_the_home_page_example_runs() -> None:
    """docs/index.md's app, as written, charges an order and ships it."""
    import asyncio
    import contextlib
    import io
    import re

    import surge

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
