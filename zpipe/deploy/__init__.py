"""A pipeline as files for container engines and clusters."""
