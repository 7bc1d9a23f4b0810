"""Section 5.4: the serving image. What it contains — model files and checksums (``artifacts``,
``checksums``), the Dockerfile parsed (``dockerfile``), the dependency footprint (``footprint``) —
and building, running and inspecting it with whichever container engine answers (``engine``,
``build``, ``run``)."""
