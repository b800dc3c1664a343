"""The control plane: a REST service that runs DFlash training jobs and keeps their history.

    dflash control-plane --db jobs.db --data-root output --checkpoint-root output/checkpoints

`main.create_app(settings)` builds the app; routes (`api/routes/`) are thin and call the job
lifecycle in `service.py`; `store.py` holds every SQL statement and `states.py` the one table of
legal job transitions; `scheduler.py` starts queued jobs, collects exits and escalates cancels
(`executors/` run the trainers). Every route but `/healthz` and the dashboard's files needs a
token when one is set (`auth.py`, `access.py`); without one, `browser_guard.py` refuses
cross-site writes.
"""
