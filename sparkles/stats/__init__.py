"""Dataset statistics: message lengths, verb–noun structure of user requests, word clouds.

``sparkles.stats.verb_noun`` (spaCy parsing, also used by SparklesDialogueVG generation to pick demos with a
unique verb–noun pair) and ``sparkles.stats.statistics`` (histograms, charts, JSON). Nothing heavy is
imported here.
"""
