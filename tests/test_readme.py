"""The README's commands and Python session are the ones that work."""

import pathlib
import re

ROOT = pathlib.Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()


def test_ci_runs_the_readme_test_command():
  quick_start = re.search(r"```bash\n(.*?)```", README, re.S).group(1)
  commands = [l for l in quick_start.splitlines() if l and not l.startswith("#")]
  assert len(commands) == 2
  assert "python -m crossrec_jax.train --config configs/demo.py" in commands[0]
  ci = (ROOT / ".ci" / "run").read_text().splitlines()
  assert commands[1] in ci


def test_readme_python_session_prints_score_matrices(capsys):
  block = re.search(r"## Using the model from Python\n\n```python\n(.*?)```", README, re.S).group(1)
  exec(compile(block, "README.md", "exec"), {})  # pylint: disable=exec-used
  out = capsys.readouterr().out
  assert "books\nrating\n" in out and "music\nlogit\n" in out
  matrices = re.findall(r"\[\[.*?\]\]", out, re.S)
  assert len(matrices) == 2 and all(m.count("[") == 3 for m in matrices)  # 2 users x 3 items
