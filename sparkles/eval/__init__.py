"""Evaluation: BISON, NLVR2 and the GPT-judged SparklesEval."""
