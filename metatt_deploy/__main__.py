"""`python -m metatt_deploy` runs the command line, like the `metatt-deploy` script."""

from metatt_deploy.cli import app

app()
