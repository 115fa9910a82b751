"""``python -m netlab`` runs the ``netlab`` command."""

from netlab.cli import console

console()
