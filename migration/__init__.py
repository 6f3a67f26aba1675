"""Container live migration with Podman and CRIU (arrives with the migration issues)."""
