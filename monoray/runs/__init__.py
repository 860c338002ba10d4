"""What every command shares to run: joining or starting Ray (`monoray.runs.cluster`)."""
