"""The README example in docs/prioritized.md runs as written (with one epoch)."""

from __future__ import annotations

import re
from pathlib import Path

DOC = Path(__file__).resolve().parents[3] / "docs" / "prioritized.md"


def test_readme_example_runs():
    code = re.search(r"```python\n(.*?)```", DOC.read_text(), re.S).group(1)
    statements = [line for line in code.splitlines() if line and not line.startswith(" ")]
    assert len(statements) <= 10
    namespace: dict = {}
    code = code.replace("epochs=5", "epochs=1").replace("load_mnist1d()",
                                                        "load_mnist1d(num_samples=1000)")
    exec(compile(code, str(DOC), "exec"), namespace)
    model = namespace["model"]
    assert int(model.sampler.step.numpy()) == 1 + 20  # initial pass, then ⌈800/40⌉ steps
    assert "val_accuracy" in model.history.history
