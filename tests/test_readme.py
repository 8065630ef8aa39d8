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


def test_layout_names_every_module():
  """Each module under crossrec_jax/ is named in the README's Layout block: a subpackage's in
  its own entry (``data/``, ``models/``, ``baselines/``), the others in the top-level entries."""
  block = re.search(r"## Layout\n.*?```\n(.*?)```", README, re.S).group(1)
  entries, key = {}, None
  for line in block.splitlines()[1:]:  # below the crossrec_jax/ line
    if re.match(r"  \S", line):  # an entry starts two spaces in; deeper lines continue it
      first = line.split()[0]
      key = first if first.endswith("/") else ""
    entries[key] = entries.get(key, "") + line + "\n"
  package = ROOT / "crossrec_jax"
  missing = [str(f.relative_to(package)) for f in sorted(package.rglob("*.py"))
             if f.name != "__init__.py" and not re.search(
                 rf"\b{re.escape(f.name)}", entries.get(
                     "" if f.parent == package else f"{f.parent.name}/", ""))]
  assert not missing, f"modules not in the README's Layout: {missing}"
