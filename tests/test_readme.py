"""The README's Python tour runs as written."""

import re
from pathlib import Path

README = Path(__file__).resolve().parents[1] / "README.md"


def test_readme_tour_runs() -> None:
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), re.S)
    assert blocks, "README has no python example"
    namespace: dict = {}
    exec(compile(blocks[0], "README.md", "exec"), namespace)  # noqa: S102
    assert tuple(namespace["out"].tokens.shape) == (4, 16)


def test_readme_starts_with_the_two_commands() -> None:
    text = README.read_text()
    bash = re.findall(r"```bash\n(.*?)```", text, re.S)
    assert "matgen generate" in bash[0] and "pip install" in bash[0]
    assert "pytest" in bash[1] and "pip install" in bash[1]
    ci = (README.parent / ".ci" / "run").read_text()
    readme_cmd = bash[1].strip().split(" && ", 2)[2]  # after creating and activating the venv
    assert readme_cmd.replace("pip install ", "pip install -q ") in ci
