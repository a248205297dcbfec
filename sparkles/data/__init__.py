"""Data for Sparkles: dialogue datasets, and the procedurally generated CPU world (``sparkles.data.synthetic``)."""
