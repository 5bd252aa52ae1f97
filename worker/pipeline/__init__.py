"""One audit on plain values, run by run: load → dense baseline (measured once) → for every planned run:
prune → (fine-tune / mitigate) → measure like every other run. No database, no Celery: `worker.tasks` feeds
it `worker.inputs.AuditInputs` and stores the typed `results.runs.RunResult` of every run."""
