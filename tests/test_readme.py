"""The README's "Explain a model you trained yourself" runs as written, in an empty folder."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import mlflow

from tests.conftest import env_for

REPO = Path(__file__).resolve().parents[1]


def _section_blocks(title: str) -> list[tuple[str, str]]:
    text = (REPO / "README.md").read_text()
    start = text.index(f"## {title}\n")
    end = text.index("\n## ", start + 1)
    return re.findall(r"```(python|bash)\n(.*?)```", text[start:end], flags=re.S)


def test_explain_a_model_you_trained_yourself_runs_as_written(tmp_path: Path) -> None:
    blocks = _section_blocks("Explain a model you trained yourself")
    assert [kind for kind, _ in blocks] == ["python", "bash", "python"]
    log_model, cli, evaluate = (code for _, code in blocks)
    env = env_for(f"sqlite:///{tmp_path / 'mlflow.db'}", tmp_path / "work")
    env.pop("MLFLOW_TRACKING_URI")  # the example sets its own store: ./mlflow.db

    def run(cmd: list[str]) -> subprocess.CompletedProcess[str]:
        done = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, done.stderr[-3000:]
        return done

    run([sys.executable, "-c", log_model])
    words = cli.split()
    assert words[0] == "mlflow-xai"
    explained = run([str(Path(sys.executable).parent / "mlflow-xai"), *words[1:]])
    assert "(explains models:/my-net/1)" in explained.stdout
    evaluated = run([sys.executable, "-c", log_model + evaluate])
    r2, dead, report = evaluated.stdout.split()[-3:]
    assert float(r2) <= 1.0 and 0.0 <= float(dead) <= 1.0 and report.endswith("xai/report.html")

    client = mlflow.MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    runs = client.search_runs([e.experiment_id for e in client.search_experiments()])
    explain_runs = [r for r in runs if r.data.tags.get("mlflow_xai.role") == "explain"]
    assert len(explain_runs) == 1 and explain_runs[0].info.status == "FINISHED"
    assert {"xai/report.html", "xai/summary.json"} <= {
        f.path for f in client.list_artifacts(explain_runs[0].info.run_id, "xai")}
