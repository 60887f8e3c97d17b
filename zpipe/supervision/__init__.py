"""Starting replicas, watching that they live, and driving a run to its end."""
