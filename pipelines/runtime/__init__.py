"""The Ray runtime: the session and pool sizing, the worker actors (one module per role
under ``workers/``), and the driver-side fan-out and reduction over them."""
