"""What every run shares, whatever executes it (one process, Ray Train workers, a Tune trial):
checkpoints (`checkpoint`), seeds (`seeding`), the device (`device`), atomic files (`files`),
joining or starting Ray (`cluster`), Train launch and reports (`workers`) and how a run
ends (`outcome`)."""
