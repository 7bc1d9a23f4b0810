"""Helpers for the book's notebooks (what a page shows, in both languages)."""
