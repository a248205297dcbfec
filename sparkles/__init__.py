"""Sparkles: multi-image multimodal chat (SparklesChat), data generation and evaluation."""
__version__ = "0.1.0"
