"""Sub-commands of the `q4kdistill` CLI, one module each (see q4kdistill/cli.py)."""
