"""Training data: dialogue, caption and LLaVA datasets, their ratio mixture, and webdataset shards."""
