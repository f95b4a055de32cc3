"""``python -m choreograph`` is the ``choreograph`` command."""

from choreograph.cli import main

main()
