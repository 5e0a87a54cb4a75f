"""The project's set-up files agree with each other, and the CLI starts fast."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import tomllib
import yaml

REPO = Path(__file__).resolve().parents[1]


def test_conda_yaml_pip_list_equals_pyproject_dependencies() -> None:
    deps = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["dependencies"]
    conda = yaml.safe_load((REPO / "conda.yaml").read_text())
    pip_lists = [d["pip"] for d in conda["dependencies"] if isinstance(d, dict) and "pip" in d]
    assert len(pip_lists) == 1
    assert sorted(pip_lists[0]) == sorted(deps)
    assert "pip" in conda["dependencies"]


def test_mlproject_entry_points_and_parameters() -> None:
    spec = yaml.safe_load((REPO / "MLproject").read_text())
    assert spec["conda_env"] == "conda.yaml"
    assert set(spec["entry_points"]["train"]["parameters"]) == {
        "config", "data", "target", "register_as", "alias", "config_from_run", "config_from_experiment", "metric",
        "mode"}
    assert set(spec["entry_points"]["explain"]["parameters"]) == {
        "run_id", "model_uri", "data", "target", "task", "allow_pickle"}
    assert set(spec["entry_points"]["compare"]["parameters"]) == {"a", "b", "fail_above", "data", "allow_pickle"}
    for ep in spec["entry_points"].values():
        for name in ep["parameters"]:
            assert "{" + name + "}" in ep["command"]


def test_torch_requirement_is_a_range_and_ci_uses_the_readme_command() -> None:
    deps = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["dependencies"]
    torch_req = next(d for d in deps if d.startswith("torch"))
    assert "==" not in torch_req
    assert "make test" in (REPO / ".ci" / "run").read_text()
    readme = (REPO / "README.md").read_text()
    assert "make demo" in readme and "make test" in readme
    makefile = (REPO / "Makefile").read_text()
    # the pinned CPU wheel goes in before the package's own range is resolved
    assert makefile.index('pip install -q "$(TORCH)"') < makefile.index('pip install -q -e ".[test]"')


def test_help_answers_without_importing_torch_or_mlflow() -> None:
    code = ("import sys, time; t=time.time(); from mlflow_xai.cli import main\n"
            "try:\n    main(['--help'])\nexcept SystemExit:\n    pass\n"
            "print(time.time()-t, 'torch' in sys.modules, 'mlflow' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    elapsed, torch_loaded, mlflow_loaded = out.stdout.strip().splitlines()[-1].split()
    assert (torch_loaded, mlflow_loaded) == ("False", "False")
    assert "train" in out.stdout and "explain" in out.stdout

