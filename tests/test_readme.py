"""The README's promises: its Python snippet runs as written, and CI runs its test command."""

import os
import re

import pytest

ROOT = os.path.join(os.path.dirname(__file__), "..")


def readme() -> str:
    with open(os.path.join(ROOT, "README.md"), encoding="utf-8") as handle:
        return handle.read()


def test_python_snippet_runs_as_written(tmp_path, monkeypatch):
    blocks = re.findall(r"```python\n(.*?)```", readme(), flags=re.S)
    assert blocks, "the README has no python snippet"
    monkeypatch.chdir(tmp_path)
    namespace: dict = {}
    exec(compile(blocks[0], "README.md", "exec"), namespace)
    trainer = namespace["trainer"]
    assert trainer.state.global_step == 10
    assert (tmp_path / "gnm-output" / "adapter_config.json").exists()
    assert any("loss_gnm" in entry for entry in trainer.state.log_history)


def test_ci_runs_the_readme_test_command():
    commands = re.findall(r"```bash\n# 2\. The tests\n(.+)\n```", readme())
    assert len(commands) == 1
    with open(os.path.join(ROOT, ".ci", "run"), encoding="utf-8") as handle:
        assert commands[0] in handle.read()


@pytest.mark.parametrize("heading", ["# 1. The main job", "# 2. The tests"])
def test_exactly_two_setup_commands(heading):
    assert readme().count(heading) == 1
