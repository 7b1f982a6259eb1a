"""Clients of dprouter, one folder per language."""
