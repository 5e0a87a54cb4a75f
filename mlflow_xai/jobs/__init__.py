"""The jobs behind the CLI and the MLproject entry points, each one readable function.

``train.train_and_log``: a tuned config fitted and logged in one MLflow run;
``explain.explain_and_log``: a model's ``xai/`` artifacts in one MLflow run;
``compare.compare_and_log``: two models' ``xai/compare/`` artifacts in one MLflow run;
``common``: what they share (progress line, device, our checkpoint, its test rows).
"""
