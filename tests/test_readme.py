"""The README's code runs as written: its usage example, and every other ```python block."""

import re
from pathlib import Path

README = Path(__file__).resolve().parents[1] / "README.md"


def test_usage_example_runs():
    text = README.read_text()
    code = re.search(r"## Using it\n\n```python\n(.*?)```", text, re.S).group(1)
    # Every Python block of the README, in order, in one namespace: the usage example first
    # (fragments marked ```python no-run are left out, as in tests/test_docs.py).
    blocks = [block for info, block in re.findall(r"^```(python[^\n]*)\n(.*?)^```", text,
                                                  re.S | re.M)
              if "no-run" not in info.split()[1:]]
    assert blocks[0] == code
    namespace: dict = {}
    for block in blocks:
        exec(compile(block, "README.md", "exec"), namespace)
    out = namespace["out"]
    assert out.sample.shape == (4, 16, 16, 4)
    # small DiT: 12 layers, 6 cached, 30 steps, interval 3 -> 10 refresh steps.
    assert int(out.layer_evaluations) == 30 * 12 - 20 * 6
