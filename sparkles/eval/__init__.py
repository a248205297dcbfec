"""Evaluation: BISON, NLVR2 and the GPT-judged SparklesEval (entry point: ``evaluate.py`` → ``cli``).

Modules: ``prompts`` (what the model is asked), ``extract`` (reading a BISON/NLVR2 choice), ``judge``
(SparklesEval judge prompt, reply parsing, GPT and reference judges), ``scores`` (accuracy and the headline
formula), ``protocol`` (default vs upstream decoding), ``data`` (annotations, images, labels), ``generator``
(the model behind one interface), ``runner`` (one shard), ``store`` (shard files and the run manifest),
``merge`` (joining shards, metrics, HTML), ``cli`` (the command line). Importing this package is cheap.
"""
