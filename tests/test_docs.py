import dataclasses
from pathlib import Path

from trl.trainer.base_config import _BaseConfig

from trl_ddrl import DDRLConfig


ROOT = Path(__file__).resolve().parents[1]


def test_every_ddrl_field_is_documented():
    docs = (ROOT / "docs" / "ddrl_trainer.md").read_text()
    base_fields = {f.name for f in dataclasses.fields(_BaseConfig)}
    own = [
        f for f in dataclasses.fields(DDRLConfig) if f.name not in base_fields or f.name in DDRLConfig.__annotations__
    ]
    missing = [f.name for f in own if f"`{f.name}" not in docs]
    assert not missing, f"fields missing from docs/ddrl_trainer.md: {missing}"
    undocumented_help = [f.name for f in own if not f.metadata.get("help")]
    assert not undocumented_help, f"fields without metadata help: {undocumented_help}"
    docstring = DDRLConfig.__doc__
    assert all(f.name in docstring for f in own if f.name not in base_fields)


def test_ci_runs_the_readme_test_command():
    readme = (ROOT / "README.md").read_text()
    ci = (ROOT / ".ci" / "run").read_text()
    command = 'pip install -c constraints.txt -e ".[test]" && python -m pytest'
    assert command in readme and command in ci
