"""`python -m server ...` is the `turnout` command."""

from server.cli import main

main()
