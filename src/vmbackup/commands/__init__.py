"""The subcommands, each with its own parser: backup, list, verify, diff, restore."""
