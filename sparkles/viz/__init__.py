"""Visualisation of Sparkles data and results as self-contained HTML pages (see ``sparkles.viz.html``)."""
