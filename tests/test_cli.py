"""Argument types of the command-line entry points: bad values are usage errors, no tracebacks."""

from __future__ import annotations

import argparse
import socket
import subprocess
import sys

import pytest

from mldeploy.cli import positive_int, positive_seconds, socket_fd


@pytest.mark.parametrize("text", ["0", "-3", "zero", "1.5", "", " "])
def test_positive_int_refuses_what_is_not_a_count(text: str) -> None:
    with pytest.raises(argparse.ArgumentTypeError, match="positive whole number"):
        positive_int(text)


@pytest.mark.parametrize("text", ["0", "-1", "nan", "inf", "-inf", "soon"])
def test_positive_seconds_refuses_what_no_clock_can_wait(text: str) -> None:
    with pytest.raises(argparse.ArgumentTypeError, match="seconds above 0"):
        positive_seconds(text)


def test_the_types_accept_what_they_describe() -> None:
    assert positive_int("7") == 7 and positive_seconds("0.25") == 0.25
    with socket.socket() as sock, open(__file__) as not_a_socket:
        assert socket_fd(str(sock.fileno())) == sock.fileno()
        with pytest.raises(argparse.ArgumentTypeError, match="open socket"):
            socket_fd(str(not_a_socket.fileno()))
    with pytest.raises(argparse.ArgumentTypeError, match="open socket"):
        socket_fd("999999")


@pytest.mark.parametrize("module", ["mldeploy.serving", "mldeploy.llm.serving"])
def test_a_server_given_a_descriptor_that_is_no_socket_says_so(module: str) -> None:
    proc = subprocess.run(
        [sys.executable, "-m", module, "--fd", "999"], capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 2 and "--fd: expected the number of an open socket" in proc.stderr
    assert "Traceback" not in proc.stderr
