"""SparklesChat and its parts; importing this package registers the ``sparkleschat`` model."""

from .sparkleschat import SparklesChat, SparklesChatConfig  # noqa: F401  (registers the model)
