"""Measuring the section 5.2 service from outside: a load generator (``loadgen``), the benchmark
behind ``make bench-serve`` (``bench``) and the models it serves (``models``)."""
