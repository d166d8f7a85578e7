"""A plugin package for the code-signing tests."""
