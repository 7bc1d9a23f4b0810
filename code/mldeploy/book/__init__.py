"""Tooling for the book itself, not deployment code: what a page shows in both languages
(``bilingual``), notebook refresh and conversion (``notebooks``), nbval's declared numeric
tolerance (``nbval_tolerance``) and the second-machine check (``second_machine``)."""
