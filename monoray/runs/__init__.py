"""How runs end and where their outputs go, whatever executes them (one process, Ray Train workers, a Tune trial)."""
