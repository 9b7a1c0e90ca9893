"""Jobs that chain the stages: run, curate, train, demo, and the report of a run."""
