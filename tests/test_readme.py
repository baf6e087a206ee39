"""The README's two commands: the test command is exactly what CI runs."""

from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _commands():
    text = (ROOT / "README.md").read_text()
    blocks = text.split("## Two commands", 1)[1].split("\n## ", 1)[0].split("```bash\n")[1:]
    return [b.split("\n```", 1)[0].strip() for b in blocks]


def test_readme_gives_exactly_two_commands_and_ci_runs_the_test_one():
    demo, tests = _commands()
    assert demo.endswith("hf-specdef demo") and "pytest" in tests
    ci = (ROOT / ".ci" / "run").read_text()
    assert tests.replace(" -q", "") in ci.replace(" -q", "")
