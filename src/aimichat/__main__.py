from aimichat.cli import cli

cli()
