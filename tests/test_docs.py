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
