"""Training the small default model and MTP modules (the `mtp-runtime train` command)."""
