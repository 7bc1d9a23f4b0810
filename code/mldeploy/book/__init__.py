"""Tooling for the book itself (not deployment code): notebook refresh and conversion."""
