"""The README's self-contained Python example runs as written."""

import re
from pathlib import Path


def test_readme_tiny_example_runs(capsys):
    readme = (Path(__file__).parents[1] / "README.md").read_text()
    blocks = re.findall(r"```python\n(.*?)```", readme, flags=re.S)
    example = next(block for block in blocks if "tiny_config" in block)
    exec(compile(example, "README.md", "exec"), {})
    assert capsys.readouterr().out.strip()


def test_readme_builtin_model_example_runs(capsys):
    readme = (Path(__file__).parents[1] / "README.md").read_text()
    blocks = re.findall(r"```python\n(.*?)```", readme, flags=re.S)
    example = next(block for block in blocks if "from_pretrained()" in block)
    exec(compile(example, "README.md", "exec"), {})
    caption, truth = capsys.readouterr().out.strip().splitlines()
    from dam.shapes import parse_caption

    assert None not in parse_caption(caption).values(), caption  # a complete ShapesDLC caption
    assert parse_caption(truth) is not None
