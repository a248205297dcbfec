"""Test helpers shared by the project's test-suite (no test framework imports here)."""
