"""Section 5.4: what the serving image contains — model files and checksums (``artifacts``,
``checksums``), the Dockerfile parsed (``dockerfile``) and the dependency footprint
(``footprint``)."""
