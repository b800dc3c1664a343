"""The control plane: a REST service that runs DFlash training jobs and keeps their history.

    dflash control-plane --db jobs.db --data-root output --checkpoint-root output/checkpoints

Layout (one job per module):

    main.py            create_app(settings): routers, middleware, error mapping, lifespan
    settings.py        runtime settings (flags and DFLASH_CONTROL_PLANE_* variables)
    api/deps.py        Annotated dependencies the routes ask for (service, logs, auth)
    api/routes/        thin HTTP handlers: jobs, job metrics, logs, checkpoints, system
    schemas.py         what goes in and out over HTTP (JobCreate, JobPublic, ...)
    states.py          job states and the one table of legal transitions
    service.py         the job lifecycle: submit, cancel, resume, delete, metrics, exits
    store.py           every SQL statement (SQLAlchemy Core; SQLite by default, any URL)
    migrations.py      the versioned schema, applied at start
    scheduler.py       starts queued jobs on free GPUs, collects exits, escalates cancels
    gpus.py            which GPUs exist and which are free
    executors/         how a job's trainer is run: the `Executor` protocol and `local`
    paths.py           job paths confined to the data and checkpoint roots
    auth.py            the bearer token on every route, checked before the body (middleware)
    access.py          which token reaches which route (one table; the rest is admin-only)
    credentials.py     admin, agent and per-job trainer tokens: whose a token is
    browser_guard.py   without a token: own Host names only, no cross-site writes
    limits.py          request body size limit
    stream_limits.py   live streams capped per client and in total
    events.py          wake-ups for live streams (SSE) when a job changes
    job_logs.py        each job's log file: tail, follow, size bound
    checkpoints.py     a job's checkpoint folders and their tar.gz archives
    prometheus.py      /metrics in the Prometheus text format
"""
