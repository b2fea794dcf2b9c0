"""CLI subcommands that live next to their feature (registered by moshax.cli)."""
