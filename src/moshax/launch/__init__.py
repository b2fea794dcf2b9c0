"""Launchers for TPU VM pods and GKE (JobSet / xpk); every command can be printed with --dry-run."""
