"""Section 5.4: build, run and inspect the serving image with whichever container engine answers."""
