"""``python -m mlflow_xai`` is the ``mlflow-xai`` command (used by the MLproject)."""

from mlflow_xai.cli import main

if __name__ == "__main__":
    main()
