"""What every run shares, whatever executes it (one process, Ray Train workers, a Tune trial):
joining or starting Ray (`monoray.runs.cluster`) and how a run ends (`monoray.runs.outcome`)."""
