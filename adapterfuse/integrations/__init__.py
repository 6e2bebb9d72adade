"""Integrations with model libraries. Each submodule imports its library lazily (only when called)."""
