"""The stages of a run, each a function of its inputs: fit, balance, label, verify, and
what a nightly run adds (warm start, drift). A stage never imports a command."""
