"""The README's usage example runs as written."""

import re
from pathlib import Path

README = Path(__file__).resolve().parents[1] / "README.md"


def test_usage_example_runs():
    text = README.read_text()
    code = re.search(r"## Using it\n\n```python\n(.*?)```", text, re.S).group(1)
    namespace: dict = {}
    exec(compile(code, "README.md", "exec"), namespace)
    out = namespace["out"]
    assert out.sample.shape == (4, 16, 16, 4)
    # small DiT: 12 layers, 6 cached, 30 steps, interval 3 -> 10 refresh steps.
    assert int(out.layer_evaluations) == 30 * 12 - 20 * 6
