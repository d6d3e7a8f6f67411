"""`python -m cli` is the same as `companion`."""

from cli.main import run

run()
