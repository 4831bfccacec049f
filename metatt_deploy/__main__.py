"""`python -m metatt_deploy` runs the command line, like the `metatt-deploy` script."""

from .cli import app

app()
