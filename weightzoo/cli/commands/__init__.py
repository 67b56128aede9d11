"""One module per CLI subcommand (see weightzoo.cli)."""
