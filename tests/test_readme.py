"""The README's self-contained Python example runs as written."""

import re
from pathlib import Path


def test_readme_tiny_example_runs(capsys):
    readme = (Path(__file__).parents[1] / "README.md").read_text()
    blocks = re.findall(r"```python\n(.*?)```", readme, flags=re.S)
    example = next(block for block in blocks if "tiny_config" in block)
    exec(compile(example, "README.md", "exec"), {})
    assert capsys.readouterr().out.strip()
