"""Command-line launchers (absl): `python -m launch.<name> --help`."""
