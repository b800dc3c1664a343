"""Route modules, one per resource: jobs, job metrics, job logs, job checkpoints, system."""
