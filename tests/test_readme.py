"""Every ```python block of README.md runs as written, so the examples cannot drift from the
API, and a `print(...)  # text` line must print that text. Each block runs in a fresh namespace
inside a temporary directory (the peft example writes an adapter folder)."""

import pathlib
import re

import pytest

README = pathlib.Path(__file__).resolve().parent.parent / "README.md"
BLOCKS = re.findall(r"```python\n(.*?)```", README.read_text(encoding="utf-8"), flags=re.S)


def test_readme_has_examples():
    assert len(BLOCKS) >= 3


@pytest.mark.parametrize("index", range(len(BLOCKS)))
def test_readme_example_runs(index, tmp_path, monkeypatch, capsys):
    source = BLOCKS[index]
    for module in re.findall(r"^(?:from|import) (\w+)", source, flags=re.M):
        pytest.importorskip(module)
    monkeypatch.chdir(tmp_path)
    exec(compile(source, f"README.md example {index}", "exec"), {"__name__": "__readme__"})
    printed = capsys.readouterr().out
    for expected in re.findall(r"^\s*print\(.*\)\s+#\s*(.+?)\s*$", source, flags=re.M):
        assert expected in printed, f"README example {index} printed {printed!r}"
