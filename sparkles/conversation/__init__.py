"""The conversation template, the single renderer for training and inference, and the chat engine."""
