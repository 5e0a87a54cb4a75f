"""The figures of the artifact contract, as matplotlib Figures (never shown, never saved here).

``layers``: weight and gradient heatmaps, distribution grids, mean activations;
``attributions``: attribution bars, conductance, weights against conductance;
``compare``: drift bars, overlaid distributions, predictions of two models;
``diagram``: the architecture (torchviz DOT rendered by graphviz-pure);
``style``: the layout and look they share, and :func:`~mlflow_xai.figures.style.figure_to_png`.
"""
