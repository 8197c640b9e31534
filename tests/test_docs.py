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
