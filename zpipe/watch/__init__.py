"""A running pipeline seen from outside: snapshots, views, status, metrics and health."""
