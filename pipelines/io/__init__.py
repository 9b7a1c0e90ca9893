"""Storage, planning, reading and validation, the output layout and checkpoints."""
